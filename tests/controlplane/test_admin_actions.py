"""What staff do in the admin all day: each action works, is audited, and is refused to
staff without the permission; anonymous users and customers get no admin at all."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest
from asgiref.sync import async_to_sync
from django.contrib import admin
from django.contrib.auth.models import Permission
from django.db import models
from django.test import Client
from django.urls import reverse
from django.utils import timezone
from django.utils.html import escape

from controlplane.accounts.models import APIKey, User
from controlplane.audit.models import AuditLog
from controlplane.billing.credits import credit_balance
from controlplane.billing.models import LedgerEntry, PlanAssignment
from controlplane.datasets import catalog
from controlplane.datasets.models import AccessGrant, DatasetVersion, File, Listing
from controlplane.inference.models import Deployment
from controlplane.limits.models import Budget, KeyLimits
from controlplane.modelregistry.models import CustomerModel
from controlplane.payments import access
from controlplane.payments.models import Dunning, Subscription
from controlplane.tenancy.models import Invitation, Organization
from controlplane.tenancy.services import invitation_create
from tests.controlplane.datasets.test_catalog import publish, ready_version
from tests.support.budgets import monthly_budget
from tests.support.jobs import chat_rows, upload_file
from tests.support.people import SYSTEM, Person, sign_up
from tests.support.registry import customer_model

pytestmark = pytest.mark.django_db

#: As a sync caller runs it (its database look-up on this thread, in the test's transaction).
inference_refusal = async_to_sync(access.ainference_refusal)

REGISTERED = sorted(admin.site._registry, key=lambda m: m._meta.label)


def changelist(model: type[models.Model]) -> str:
    return reverse(f"admin:{model._meta.app_label}_{model._meta.model_name}_changelist")


def change_page(obj: models.Model, view: str = "change") -> str:
    meta = obj._meta
    return reverse(f"admin:{meta.app_label}_{meta.model_name}_{view}", args=[obj.pk])


def staff_client(*perms: str, email: str = "ops@atelier.test") -> Client:
    """A logged-in staff user holding exactly `perms` ("app_label.codename")."""
    user = User.objects.create_user(email=email, password="staff pass 12345", is_staff=True)
    for perm in perms:
        app_label, codename = perm.split(".")
        user.user_permissions.add(
            Permission.objects.get(content_type__app_label=app_label, codename=codename)
        )
    client = Client()
    client.force_login(user)
    return client


def superuser_client() -> Client:
    user = User.objects.create_superuser(email="root@atelier.test", password="staff pass 12345")
    client = Client()
    client.force_login(user)
    return client


def act(
    client: Client, model: type[models.Model], action: str, objs: list[Any], **form: Any
) -> Any:
    """Post an admin action on `objs`; with `form`, also its input page's fields (`apply`)."""
    data: dict[str, Any] = {"action": action, "_selected_action": [o.pk for o in objs]}
    if form:
        data |= {"apply": "yes", **form}
    return client.post(changelist(model), data)


def rows_of(client: Client, url: str) -> list[Any]:
    """The rows a list page shows."""
    response: Any = client.get(url)
    assert response.status_code == 200, url
    return list(response.context_data["cl"].result_list)


def audit(org: Organization | str, action: str) -> list[AuditLog]:
    return list(AuditLog.objects.for_organization(org).filter(action=action))


def messages_of(response: Any) -> list[str]:
    return [str(m) for m in response.wsgi_request._messages]


@pytest.fixture
def globex(charlie: Person) -> Organization:
    return charlie.organization


# --- who gets in ---------------------------------------------------------------------------


def test_anonymous_users_are_sent_to_the_login_page(db: None) -> None:
    client = Client()
    for model in REGISTERED:
        url = changelist(model)
        response = client.get(url)
        assert response.status_code == 302, url
        assert response["Location"].startswith("/admin/login/"), url


def test_customers_get_no_admin(alice: Person) -> None:
    client = Client()
    client.force_login(alice.user)  # a real session, but not staff
    assert client.get("/admin/").status_code == 302
    for model in REGISTERED:
        response = client.get(changelist(model))
        assert response.status_code == 302, model
        assert response["Location"].startswith("/admin/login/")


def test_staff_without_permissions_see_no_page(alice: Person) -> None:
    client = staff_client()
    index = client.get("/admin/")
    assert index.status_code == 200
    assert b"Organizations" not in index.content
    for model in REGISTERED:
        assert client.get(changelist(model)).status_code == 403, model


# --- organizations: suspend and restore, credit, plan -----------------------------------------

CAN_CHANGE_ORGS = ("tenancy.view_organization", "tenancy.change_organization")


def test_staff_suspend_an_organization_and_restore_it_audited(
    alice: Person, globex: Organization, django_capture_on_commit_callbacks: Any
) -> None:
    client = staff_client(*CAN_CHANGE_ORGS)
    org = alice.organization

    asked = act(client, Organization, "suspend", [org])
    assert asked.status_code == 200
    assert b'name="reason"' in asked.content  # the action's input page
    assert inference_refusal(org.pk) is None
    with django_capture_on_commit_callbacks(execute=True):
        done = act(client, Organization, "suspend", [org], reason="card fraud, ticket 42")

    assert done.status_code == 302
    refusal = inference_refusal(org.pk)
    assert refusal is not None
    assert (refusal.status_code, refusal.code) == (403, "organization_suspended")
    assert "suspended for this organization by Atelier staff" in str(refusal.detail)
    assert inference_refusal(globex.pk) is None
    [entry] = audit(org, "admin.organization.suspended")
    assert (entry.actor_type, entry.actor_email) == ("staff", "ops@atelier.test")
    assert entry.details["reason"] == "card fraud, ticket 42"
    listed = rows_of(client, changelist(Organization) + "?standing=suspended")
    assert [o.pk for o in listed] == [org.pk]

    # Suspending again adds nothing.
    act(client, Organization, "suspend", [org], reason="again")
    assert len(audit(org, "admin.organization.suspended")) == 1

    with django_capture_on_commit_callbacks(execute=True):
        act(client, Organization, "restore", [org])
    assert inference_refusal(org.pk) is None
    [restored] = audit(org, "admin.organization.restored")
    assert restored.details["resolved"] == [entry.details["suspension"]]


def test_restore_lifts_an_unpaid_invoice_suspension_too(
    alice: Person, django_capture_on_commit_callbacks: Any
) -> None:
    org = alice.organization
    past = timezone.now() - timedelta(days=10)
    Dunning.objects.create(
        organization=org, stripe_invoice_id="in_late", started_at=past, grace_ends_at=past
    )
    assert inference_refusal(org.pk) is not None

    with django_capture_on_commit_callbacks(execute=True):
        act(staff_client(*CAN_CHANGE_ORGS), Organization, "restore", [org])

    assert inference_refusal(org.pk) is None
    assert audit(org, "admin.organization.restored")[0].details["resolved"] == ["in_late"]


def test_staff_who_may_only_view_organizations_cannot_suspend(alice: Person) -> None:
    client = staff_client("tenancy.view_organization")
    org = alice.organization

    assert b'value="suspend"' not in client.get(changelist(Organization)).content
    act(client, Organization, "suspend", [org], reason="no")

    assert inference_refusal(org.pk) is None
    assert not Dunning.objects.for_organization(org).exists()
    assert audit(org, "admin.organization.suspended") == []


def test_staff_grant_credit_once_per_form_audited(alice: Person, globex: Organization) -> None:
    client = staff_client("tenancy.view_organization", "billing.add_creditgrant")
    org = alice.organization

    page = act(client, Organization, "grant_credit", [org, globex])
    token = page.context_data["form"].initial["token"]
    form = {"amount": "25.00", "note": "sorry for the outage", "token": token}
    act(client, Organization, "grant_credit", [org, globex], **form)
    act(client, Organization, "grant_credit", [org, globex], **form)  # submitted twice

    assert credit_balance(org) == credit_balance(globex) == Decimal("25.00")
    [entry] = audit(org, "admin.organization.credit_granted")
    assert entry.details["amount"] == "25.00"
    assert entry.details["note"] == "sorry for the outage"
    assert entry.actor_email == "ops@atelier.test"
    listed = client.get(changelist(Organization) + "?q=Acme")
    assert b"25.00" in listed.content  # the credit column


def test_a_bad_credit_amount_shows_the_form_again_and_grants_nothing(alice: Person) -> None:
    client = staff_client("tenancy.view_organization", "billing.add_creditgrant")

    response = act(
        client, Organization, "grant_credit", [alice.organization], amount="-5", note="x", token="t"
    )

    assert response.status_code == 200
    assert response.context_data["form"].errors["amount"]
    assert credit_balance(alice.organization) == 0


def test_granting_credit_needs_the_credit_permission(alice: Person) -> None:
    client = staff_client(*CAN_CHANGE_ORGS)  # may change organizations, not add credit

    act(client, Organization, "grant_credit", [alice.organization], amount="5", note="x", token="t")

    assert credit_balance(alice.organization) == 0
    assert audit(alice.organization, "admin.organization.credit_granted") == []


def test_staff_change_a_plan_with_its_history_audited(alice: Person) -> None:
    client = staff_client(*CAN_CHANGE_ORGS)
    org = alice.organization

    act(client, Organization, "change_plan", [org], plan="pro")

    org.refresh_from_db()
    assert org.plan == "pro"
    history = PlanAssignment.objects.for_organization(org).order_by("effective_from")
    assert [a.plan_id for a in history] == ["free", "pro"]
    [entry] = audit(org, "admin.organization.plan_changed")
    assert entry.details == {"from": "free", "to": "pro"}


def test_a_plan_paid_by_a_stripe_subscription_is_not_changed_here(alice: Person) -> None:
    org = alice.organization
    Subscription.objects.create(organization=org, plan="pro", status="active")

    response = act(staff_client(*CAN_CHANGE_ORGS), Organization, "change_plan", [org], plan="free")

    org.refresh_from_db()
    assert org.plan == "free"  # unchanged: it was never moved
    assert not PlanAssignment.objects.for_organization(org).exists()
    assert any("Stripe subscription" in m for m in messages_of(response))
    assert audit(org, "admin.organization.plan_changed") == []


# --- users, members, invitations, API keys ------------------------------------------------------


def test_search_finds_organizations_by_member_email(
    alice: Person, bob: Person, globex: Any
) -> None:
    client = staff_client("tenancy.view_organization")

    found = rows_of(client, changelist(Organization) + "?q=bob@acme.test")

    assert [o.pk for o in found] == [alice.organization.pk]


def test_staff_changes_to_a_user_are_audited_in_their_organizations(
    alice: Person, bob: Person
) -> None:
    client = staff_client("accounts.view_user", "accounts.change_user")
    url = change_page(bob.user)
    page: Any = client.get(url)
    form = page.context_data["adminform"].form
    data = {k: v for k, v in form.initial.items() if v is not None and k != "password"}
    data |= {"is_active": "", "name": "Bob B.", "groups": [], "user_permissions": []}
    data |= {"last_login_0": "", "last_login_1": ""}
    joined = bob.user.date_joined
    for prefix in ("", "initial-"):  # as the browser posts the form
        data |= {f"{prefix}date_joined_0": f"{joined:%Y-%m-%d}"}
        data |= {f"{prefix}date_joined_1": f"{joined:%H:%M:%S}"}
    data |= {"memberships-TOTAL_FORMS": "1", "memberships-INITIAL_FORMS": "1"}
    data |= {"memberships-0-id": bob.membership.pk, "memberships-0-user": bob.user.pk}

    response: Any = client.post(url, data)

    assert response.status_code == 302, response.context_data["adminform"].form.errors
    bob.user.refresh_from_db()
    assert (bob.user.is_active, bob.user.name) == (False, "Bob B.")
    [entry] = audit(alice.organization, "admin.user.changed")
    assert entry.details == {"name": "Bob B.", "is_active": "False"}
    assert entry.actor_email == "ops@atelier.test"


def test_a_password_set_by_staff_is_audited_without_the_password(
    alice: Person, bob: Person
) -> None:
    client = staff_client("accounts.view_user", "accounts.change_user")
    new = "another long passphrase 77"

    response = client.post(
        reverse("admin:auth_user_password_change", args=[bob.user.pk]),
        {"password1": new, "password2": new, "usable_password": "true"},
    )

    assert response.status_code == 302
    bob.user.refresh_from_db()
    assert bob.user.check_password(new)
    [entry] = audit(alice.organization, "admin.user.password_changed")
    assert entry.details == {}
    assert new not in json.dumps(entry.details)


def test_staff_revoke_an_invitation_audited(alice: Person) -> None:
    invitation = invitation_create(
        organization=alice.organization,
        email="new@acme.test",
        role="developer",
        actor_role="owner",
        invited_by_id=alice.user.pk,
        actor=SYSTEM,
    ).invitation
    viewer = staff_client("tenancy.view_invitation", email="viewer@atelier.test")
    act(viewer, Invitation, "revoke_invitations", [invitation])
    invitation.refresh_from_db()
    assert invitation.status == "pending"

    act(
        staff_client("tenancy.view_invitation", "tenancy.change_invitation"),
        Invitation,
        "revoke_invitations",
        [invitation],
    )

    invitation.refresh_from_db()
    assert invitation.status == "revoked"
    assert audit(alice.organization, "invite.revoked")[0].actor_email == "ops@atelier.test"


def test_staff_revoke_keys_audited_and_viewers_cannot(alice: Person) -> None:
    key = APIKey.objects.for_organization(alice.organization).get()
    act(
        staff_client("accounts.view_apikey", email="viewer@atelier.test"),
        APIKey,
        "revoke_keys",
        [key],
    )
    key.refresh_from_db()
    assert key.revoked_at is None

    act(
        staff_client("accounts.view_apikey", "accounts.change_apikey"),
        APIKey,
        "revoke_keys",
        [key],
    )

    key.refresh_from_db()
    assert key.revoked_at is not None
    assert alice.client.get("/v1/me").status_code == 401
    [entry] = audit(alice.organization, "api_key.revoked")
    assert (entry.actor_type, entry.actor_email) == ("staff", "ops@atelier.test")


def test_no_admin_page_shows_a_key_secret_or_its_hash(alice: Person, bob: Person) -> None:
    client = superuser_client()
    key = APIKey.objects.for_organization(alice.organization).get(member=alice.membership)
    pages = [
        changelist(APIKey),
        changelist(APIKey) + f"?q={key.prefix}",
        changelist(APIKey) + "?status=active",
        change_page(key),
        change_page(key, "history"),
        change_page(alice.organization),
        change_page(alice.membership),
        change_page(alice.user),
        changelist(AuditLog) + "?q=api_key",
    ]
    for page in pages:
        response = client.get(page)
        assert response.status_code == 200, page
        html = response.content
        for secret in (alice.key, bob.key, key.hashed_key):
            assert secret.encode() not in html, page
            assert secret.split("_")[-1].encode() not in html, page  # nor its secret part
    listed = client.get(changelist(APIKey) + f"?q={key.prefix}")
    assert key.redacted_value.encode() in listed.content


def test_the_key_status_filter(alice: Person, bob: Person) -> None:
    client = superuser_client()
    bobs = APIKey.objects.for_organization(alice.organization).get(member=bob.membership)
    bobs.revoked_at = timezone.now()
    bobs.save()

    revoked = rows_of(client, changelist(APIKey) + "?status=revoked")
    active = rows_of(client, changelist(APIKey) + "?status=active")

    assert [k.pk for k in revoked] == [bobs.pk]
    assert bobs.pk not in [k.pk for k in active]
    assert len(active) == 1


# --- files, dataset versions, catalog -----------------------------------------------------------


@pytest.fixture
def partner(db: None) -> Person:
    return sign_up("dana@mathdata.test", "MathData", kinds=["data_partner"])


def test_a_files_validation_report_is_readable_on_its_page(
    alice: Person, django_capture_on_commit_callbacks: Any
) -> None:
    content = chat_rows(3) + b'{"messages": "not a list"}\n'
    file_id = upload_file(alice, content, django_capture_on_commit_callbacks, name="bad.jsonl")
    file = File.objects.for_organization(alice.organization).get(pk=file_id)
    assert file.status == "error"
    client = superuser_client()

    page = client.get(change_page(file)).content.decode()
    errors = rows_of(client, changelist(File) + "?status__exact=error")

    assert '<table class="report">' in page
    assert "<th>error_count</th><td>1</td>" in page
    report: Any = file.validation
    assert f"<th>rows</th><td>{report['rows']}</td>" in page
    assert escape(report["errors"][0]["reason"]) in page
    assert [f.pk for f in errors] == [file.pk]


def test_a_dataset_versions_preprocessing_report_is_readable_on_its_page(
    partner: Person, django_capture_on_commit_callbacks: Any
) -> None:
    version_id = ready_version(partner, django_capture_on_commit_callbacks)
    version = DatasetVersion.objects.for_organization(partner.organization).get(pk=version_id)
    assert version.report is not None

    page = superuser_client().get(change_page(version)).content.decode()

    assert "Preprocessing report" in page
    assert f"<th>rows_in</th><td>{version.report['rows_in']}</td>" in page
    assert f"<th>rows_out</th><td>{version.report['rows_out']}</td>" in page


def _request_access(partner: Person, customer: Person, captured: Any) -> AccessGrant:
    listing = publish(partner, ready_version(partner, captured))
    return catalog.access_request(
        organization=customer.organization, listing_id=listing["id"], note="for our tutor bot"
    )


def test_staff_approve_an_access_request_audited_for_both_sides(
    partner: Person, alice: Person, django_capture_on_commit_callbacks: Any
) -> None:
    grant = _request_access(partner, alice, django_capture_on_commit_callbacks)
    client = staff_client("datasets.view_accessgrant", "datasets.change_accessgrant")
    pending = rows_of(client, changelist(AccessGrant) + "?status__exact=pending")
    assert [g.pk for g in pending] == [grant.pk]

    act(client, AccessGrant, "approve", [grant])

    grant.refresh_from_db()
    assert grant.status == "approved"
    version = catalog.usable_version(
        organization=alice.organization, version_id=grant.listing.version_id
    )
    assert version.pk == grant.listing.version_id
    for org in (alice.organization, partner.organization):
        [entry] = audit(org, "admin.access_request.approved")
        assert entry.details["access_request_id"] == grant.pk
        assert entry.actor_email == "ops@atelier.test"

    act(client, AccessGrant, "decline", [grant])
    grant.refresh_from_db()
    assert grant.status == "declined"
    assert len(audit(partner.organization, "admin.access_request.declined")) == 1


def test_staff_who_may_only_view_requests_cannot_decide_them(
    partner: Person, alice: Person, django_capture_on_commit_callbacks: Any
) -> None:
    grant = _request_access(partner, alice, django_capture_on_commit_callbacks)

    act(staff_client("datasets.view_accessgrant"), AccessGrant, "approve", [grant])

    grant.refresh_from_db()
    assert grant.status == "pending"
    assert audit(partner.organization, "admin.access_request.approved") == []


def test_staff_unpublish_a_listing_audited(
    partner: Person, alice: Person, django_capture_on_commit_callbacks: Any
) -> None:
    listing_id = publish(partner, ready_version(partner, django_capture_on_commit_callbacks))["id"]
    listing = Listing.objects.for_organization(partner.organization).get(pk=listing_id)

    act(
        staff_client("datasets.view_listing", "datasets.change_listing"),
        Listing,
        "unpublish",
        [listing],
    )

    assert alice.client.get(f"/v1/catalog/{listing_id}").status_code == 404
    [entry] = audit(partner.organization, "admin.listing.changed")
    assert entry.details == {"listing_id": listing_id, "published": "False"}


def test_staff_delete_a_file_as_the_api_does_and_viewers_cannot(
    alice: Person, django_capture_on_commit_callbacks: Any
) -> None:
    file_id = upload_file(alice, chat_rows(3), django_capture_on_commit_callbacks)
    file = File.objects.for_organization(alice.organization).get(pk=file_id)
    act(
        staff_client("datasets.view_file", email="viewer@atelier.test"), File, "soft_delete", [file]
    )
    file.refresh_from_db()
    assert file.deleted_at is None

    with django_capture_on_commit_callbacks(execute=True):
        act(staff_client("datasets.view_file", "datasets.delete_file"), File, "soft_delete", [file])

    assert alice.client.get(f"/v1/files/{file_id}").status_code == 404
    [entry] = audit(alice.organization, "admin.file.deleted")
    assert entry.details["file_id"] == file_id


# --- models, deployments, usage, ledger ---------------------------------------------------------


def test_deleting_models_and_deployments_needs_the_delete_permission(alice: Person) -> None:
    model = customer_model(alice)
    deployment = Deployment.objects.create(
        organization=alice.organization, model_id=model.pk, type="serverless"
    )
    viewer = staff_client("modelregistry.view_customermodel", "inference.view_deployment")

    act(viewer, CustomerModel, "soft_delete", [model])
    act(viewer, Deployment, "delete_deployments", [deployment])

    model.refresh_from_db()
    deployment.refresh_from_db()
    assert (model.deleted_at, deployment.status) == (None, "active")


@pytest.fixture
def entry(alice: Person) -> LedgerEntry:
    return LedgerEntry.objects.create(
        organization=alice.organization,
        idempotency_key="req-1",
        meter="inference.prompt_tokens",
        model="test-base",
        quantity=12,
        occurred_at=timezone.now(),
        source="inference",
        reference="chatcmpl-1",
    )


def test_the_ledger_is_read_only_in_the_admin(entry: LedgerEntry) -> None:
    client = superuser_client()
    url = change_page(entry)

    page = client.get(url)
    assert page.status_code == 200
    assert b'name="_save"' not in page.content
    assert client.post(url, {"quantity": "0"}).status_code == 403
    assert client.get(change_page(entry, "delete")).status_code == 403
    assert client.post(change_page(entry, "delete"), {"post": "yes"}).status_code == 403
    assert client.get(reverse("admin:billing_ledgerentry_add")).status_code == 403
    assert b"delete_selected" not in client.get(changelist(LedgerEntry)).content
    entry.refresh_from_db()
    assert entry.quantity == 12


def test_ledger_search_and_filters(entry: LedgerEntry, charlie: Person) -> None:
    LedgerEntry.objects.create(
        organization=charlie.organization,
        idempotency_key="job-1",
        meter="training.tokens",
        quantity=1000,
        occurred_at=timezone.now(),
        source="training",
        reference="ftjob-1",
    )
    client = staff_client("billing.view_ledgerentry")

    def rows(query: str) -> list[str]:
        return [e.idempotency_key for e in rows_of(client, changelist(LedgerEntry) + query)]

    assert rows("?meter__exact=training.tokens") == ["job-1"]
    assert rows("?q=Acme") == ["req-1"]
    assert rows("?q=chatcmpl-1") == ["req-1"]


# --- limits and budgets --------------------------------------------------------------------------


def test_staff_edit_a_budget_through_the_service_audited(alice: Person) -> None:
    budget = monthly_budget(alice, "10", name="team")
    client = staff_client("limits.view_budget", "limits.change_budget")

    response: Any = client.post(
        change_page(budget),
        {"name": "team", "amount": "25", "kind": "hard", "alert_thresholds": json.dumps([50])},
    )

    assert response.status_code == 302, response.context_data["adminform"].form.errors
    budget = Budget.objects.for_organization(alice.organization).get(pk=budget.pk)
    assert (budget.amount, budget.kind, budget.alert_thresholds) == (Decimal(25), "hard", [50])
    entry = audit(alice.organization, "budget.updated")[0]
    assert (entry.actor_type, Decimal(entry.details["amount"])) == ("staff", Decimal(25))


def test_staff_set_a_keys_limits_through_the_service_audited(alice: Person) -> None:
    key = APIKey.objects.for_organization(alice.organization).get()
    client = staff_client("limits.add_keylimits", "limits.view_keylimits")

    response: Any = client.post(
        reverse("admin:limits_keylimits_add"), {"api_key": key.pk, "requests_per_minute": "7"}
    )

    assert response.status_code == 302, response.context_data["adminform"].form.errors
    limits = KeyLimits.objects.for_organization(alice.organization).get()
    assert (limits.requests_per_minute, limits.tokens_per_minute) == (7, None)
    entry = audit(alice.organization, "api_key.limits_updated")[0]
    assert entry.actor_email == "ops@atelier.test"


#: Each admin page, the filter or search on it, and who should be listed (by a label).
SEARCHES: list[tuple[type[models.Model], str, Callable[[Person, Person], set[str]]]] = [
    (Organization, "?q=globex", lambda a, c: {c.organization.pk}),
    (Organization, "?standing=good", lambda a, c: {a.organization.pk, c.organization.pk}),
    (
        APIKey,
        "?q=charlie@globex.test",
        lambda a, c: {APIKey.objects.for_organization(c.organization).get().pk},
    ),
    (User, "?q=Globex", lambda a, c: {c.user.pk}),
    (
        AuditLog,
        "?q=Globex&action__exact=api_key.created",
        lambda a, c: {
            e.pk
            for e in AuditLog.objects.for_organization(c.organization).filter(
                action="api_key.created"
            )
        },
    ),
]


@pytest.mark.parametrize(("model", "query", "expected"), SEARCHES, ids=lambda v: str(v)[:30])
def test_search_and_filters_list_the_right_rows(
    alice: Person,
    charlie: Person,
    model: type[models.Model],
    query: str,
    expected: Callable[[Person, Person], set[str]],
) -> None:
    listed = rows_of(superuser_client(), changelist(model) + query)
    assert {str(o.pk) for o in listed} == expected(alice, charlie)
