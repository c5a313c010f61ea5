"""Staff run engagements from the admin; only staff with the engagement permissions see or
act on them, and non-staff get no admin at all."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest
from django.contrib.admin.utils import quote
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext

from controlplane.accounts.models import User
from controlplane.audit.models import AuditLog
from controlplane.billing.ledger import ledger_append
from controlplane.billing.models import Meter
from controlplane.engagements import services
from controlplane.engagements.models import Engagement, Milestone
from controlplane.jobs.models import Job
from tests.controlplane.payments.test_gateway import billable
from tests.support.engagements import actor_of, engagement_for, staff_member
from tests.support.jobs import TINY_LLAMA
from tests.support.localstripe import LocalStripe
from tests.support.people import Person

from .conftest import activated

pytestmark = pytest.mark.django_db

LIST = "/admin/engagements/engagement/"


def url(engagement: Engagement, action: str = "change") -> str:
    """As the admin links to it: the pk quoted (`eng_…` is `eng_5F…` in admin URLs)."""
    return f"{LIST}{quote(engagement.pk)}/{action}/"


def logged_in(user: User) -> Client:
    client = Client()
    client.force_login(user)
    return client


def messages_of(response: Any) -> list[tuple[str, str]]:
    return [(m.level_tag, m.message) for m in response.context["messages"]]


@pytest.fixture
def ops(staff: User) -> Client:
    return logged_in(staff)


# --- who gets in --------------------------------------------------------------------------


def test_anonymous_visitors_are_sent_to_the_login_page(engagement: Engagement) -> None:
    client = Client()
    for path in (LIST, url(engagement), url(engagement, "launch"), url(engagement, "deliver")):
        response = client.get(path)
        assert response.status_code == 302
        assert response["Location"].startswith("/admin/login/")
    response = client.post(url(engagement, "transition"), {"transition": "delivered"})
    assert response.status_code == 302
    assert Engagement.objects.for_organization(engagement.organization_id).get().status == "active"


def test_customers_get_no_admin_at_all(alice: Person, engagement: Engagement) -> None:
    client = logged_in(alice.user)  # a real user, not staff
    for path in ("/admin/", LIST, url(engagement)):
        response = client.get(path)
        assert response.status_code == 302
        assert response["Location"].startswith("/admin/login/")
    client.post(url(engagement, "transition"), {"transition": "delivered"})
    assert Engagement.objects.for_organization(engagement.organization_id).get().status == "active"


def test_staff_without_the_permissions_get_nothing(engagement: Engagement) -> None:
    client = logged_in(staff_member("nobody@atelier.test", permissions=()))

    index = client.get("/admin/")
    assert index.status_code == 200
    assert b"/admin/engagements/" not in index.content
    for path in (LIST, url(engagement), url(engagement, "launch"), url(engagement, "deliver")):
        assert client.get(path).status_code == 403, path
    for action, body in (("transition", {"transition": "delivered"}), ("bill", {"bill": "x"})):
        assert client.post(url(engagement, action), body).status_code == 403
    assert client.get(f"{LIST}add/").status_code == 403
    assert Engagement.objects.for_organization(engagement.organization_id).get().status == "active"


def test_staff_who_may_only_view_see_it_but_cannot_act(engagement: Engagement, launch: Any) -> None:
    client = logged_in(staff_member("viewer@atelier.test", permissions=("view_engagement",)))

    assert client.get(LIST).status_code == 200
    page = client.get(url(engagement))
    assert page.status_code == 200
    assert b'id="engagement-status"' in page.content
    assert b'id="launch-job"' not in page.content
    assert b'name="transition"' not in page.content
    assert (
        client.post(url(engagement, "transition"), {"transition": "delivered"}).status_code == 403
    )
    assert client.get(url(engagement, "launch")).status_code == 403
    assert client.post(url(engagement, "launch"), {"kind": "fine_tuning"}).status_code == 403
    assert Engagement.objects.for_organization(engagement.organization_id).get().status == "active"
    assert not Job.objects.for_organization(engagement.organization_id).exists()


def test_each_action_needs_its_own_permission(engagement: Engagement) -> None:
    client = logged_in(
        staff_member("mover@atelier.test", permissions=("view_engagement", "move_engagement"))
    )
    page = client.get(url(engagement)).content
    assert b'name="transition"' in page
    assert b'id="launch-job"' not in page
    assert b'id="deliver-model"' not in page
    assert client.get(url(engagement, "deliver")).status_code == 403
    assert client.post(url(engagement, "bill"), {"bill": "x"}).status_code == 403
    response = client.post(url(engagement, "transition"), {"transition": "delivered"}, follow=True)
    assert ("success", "“Support bot” moved to delivered.") in messages_of(response)


# --- what staff do ------------------------------------------------------------------------


def test_staff_create_an_engagement_with_milestones(
    alice: Person, staff: User, ops: Client
) -> None:
    form = ops.get(f"{LIST}add/")
    assert form.status_code == 200
    html = form.content.decode()
    assert '<select name="organization"' in html
    assert '<select name="owner"' in html
    assert "milestones-0-title" in html
    assert "autocomplete" not in html.split('name="organization"')[1].split(">")[0]

    response = ops.post(
        f"{LIST}add/",
        {
            "organization": alice.organization.pk,
            "title": "Claims triage",
            "scope": "Classify incoming claims",
            "owner": staff.pk,
            "owner_display_name": "Olga",
            "budget_tokens": "2000000",
            "budget_gpu_seconds": "36000",
            "budget_amount": "750.00",
            "internal_notes": "friend of the CEO",
            "milestones-TOTAL_FORMS": "1",
            "milestones-INITIAL_FORMS": "0",
            "milestones-0-title": "Prototype",
            "milestones-0-due_date": "2027-02-01",
            "milestones-0-amount": "1000.00",
            "milestones-0-status": "pending",
            "milestones-0-acceptance_notes": "F1 above 0.8",
            "events-TOTAL_FORMS": "0",
            "events-INITIAL_FORMS": "0",
            "_save": "Save",
        },
    )

    assert response.status_code == 302, response.content.decode()[:3000]
    engagement = Engagement.objects.for_organization(alice.organization).get()
    assert (engagement.title, engagement.status, engagement.owner_id) == (
        "Claims triage",
        "lead",
        staff.pk,
    )
    (milestone,) = Milestone.objects.for_organization(alice.organization)
    assert (milestone.title, milestone.amount, milestone.engagement_id) == (
        "Prototype",
        Decimal("1000.00"),
        engagement.pk,
    )
    actions = set(
        AuditLog.objects.for_organization(alice.organization).values_list("action", flat=True)
    )
    assert {"engagement.created", "engagement.milestones_changed"} <= actions
    created = AuditLog.objects.for_organization(alice.organization).get(action="engagement.created")
    assert "friend of the CEO" not in str(created.details)  # field names, not internal values


def test_the_owner_must_be_staff(alice: Person, bob: Person, ops: Client) -> None:
    response = ops.post(
        f"{LIST}add/",
        {
            "organization": alice.organization.pk,
            "title": "x",
            "owner": bob.user.pk,
            "budget_tokens": "1",
            "budget_gpu_seconds": "1",
            "budget_amount": "1",
            "milestones-TOTAL_FORMS": "0",
            "milestones-INITIAL_FORMS": "0",
            "events-TOTAL_FORMS": "0",
            "events-INITIAL_FORMS": "0",
        },
    )
    assert response.status_code == 200  # the form again, with the error
    assert not Engagement.objects.for_organization(alice.organization).exists()


def test_the_change_page_shows_the_pipeline_budget_and_milestones(
    engagement: Engagement, ops: Client
) -> None:
    services.milestone_add(
        engagement=engagement,
        title="Kick-off",
        amount=Decimal(10),
        actor=actor_of(engagement.owner),
    )
    html = ops.get(url(engagement)).content.decode()
    assert 'id="engagement-status" data-status="active"' in html
    assert 'name="transition" value="delivered"' in html
    assert 'name="transition" value="cancelled"' in html
    assert 'name="transition" value="closed"' not in html  # not allowed from active
    assert f'id="launch-job" class="button" href="{url(engagement, "launch")}"' in html
    assert f'id="deliver-model" class="button" href="{url(engagement, "deliver")}"' in html
    assert '<table id="milestones">' in html
    milestone = Milestone.objects.for_organization(engagement.organization_id).get()
    assert f'name="bill" value="{milestone.pk}"' in html
    assert "cdn" not in html.lower()


def test_an_invalid_move_is_refused_with_a_message(engagement: Engagement, ops: Client) -> None:
    response = ops.post(url(engagement, "transition"), {"transition": "lead"}, follow=True)
    ((level, text),) = messages_of(response)
    assert level == "error"
    assert "cannot move from 'active' to 'lead'" in text
    assert Engagement.objects.for_organization(engagement.organization_id).get().status == "active"
    assert ops.get(url(engagement, "transition")).status_code == 405


def test_staff_launch_a_job_deliver_its_model_and_bill_a_milestone(
    alice: Person,
    engagement: Engagement,
    ops: Client,
    chat_file: str,
    succeed: Any,
    stripe_settings: LocalStripe,
    django_capture_on_commit_callbacks: Any,
) -> None:
    form = ops.get(url(engagement, "launch"))
    assert form.status_code == 200
    assert b'id="launch"' in form.content
    assert chat_file.encode() in form.content  # the customer's files are listed

    with django_capture_on_commit_callbacks(execute=True):
        launched = ops.post(
            url(engagement, "launch"),
            {
                "kind": "fine_tuning",
                "model": TINY_LLAMA,
                "training_file": chat_file,
                "suffix": "claims",
                "n_epochs": "2",
            },
            follow=True,
        )
    ((level, text),) = messages_of(launched)
    assert level == "success", text
    job = Job.objects.for_organization(alice.organization).get()
    assert job.engagement_id == engagement.pk
    assert job.hyperparameters["n_epochs"] == 2
    assert job.pk in text

    deliver_page = ops.get(url(engagement, "deliver"))
    assert b"nothing-to-deliver" in deliver_page.content  # not succeeded yet
    job = succeed(job)
    deliver_page = ops.get(url(engagement, "deliver"))
    assert f'<option value="{job.fine_tuned_model}"'.encode() in deliver_page.content
    delivered = ops.post(
        url(engagement, "deliver"), {"model": job.fine_tuned_model, "deploy": "on"}, follow=True
    )
    assert messages_of(delivered)[0][0] == "success"
    assert job.fine_tuned_model in {m["id"] for m in alice.client.get("/v1/models").json()["data"]}

    stripe_settings.forget_webhooks()
    billable(stripe_settings, alice)
    milestone = services.milestone_add(
        engagement=engagement,
        title="Done",
        amount=Decimal("99.00"),
        actor=actor_of(engagement.owner),
    )
    billed = ops.post(url(engagement, "bill"), {"bill": milestone.pk}, follow=True)
    ((level, text),) = messages_of(billed)
    assert level == "success", text
    again = ops.post(url(engagement, "bill"), {"bill": milestone.pk}, follow=True)
    ((level, text),) = messages_of(again)
    assert (level, "nothing new was created" in text) == ("error", True)
    assert b'class="error"' in again.content  # the .messagelist .error the browser sees

    actions = list(
        AuditLog.objects.for_organization(alice.organization)
        .filter(
            action__in=[
                "engagement.job_launched",
                "engagement.model_delivered",
                "engagement.milestone_billed",
            ]
        )
        .values_list("action", "actor_email")
    )
    assert sorted(actions) == [
        ("engagement.job_launched", "ops@atelier.test"),
        ("engagement.milestone_billed", "ops@atelier.test"),
        ("engagement.model_delivered", "ops@atelier.test"),
    ]


def test_a_launch_over_budget_shows_why_and_creates_nothing(
    alice: Person, engagement: Engagement, ops: Client, chat_file: str
) -> None:
    Engagement.objects.for_organization(alice.organization).filter(pk=engagement.pk).update(
        budget_tokens=10
    )
    response = ops.post(
        url(engagement, "launch"),
        {"kind": "fine_tuning", "model": TINY_LLAMA, "training_file": chat_file},
    )
    assert response.status_code == 200  # the form again, filled in
    ((level, text),) = messages_of(response)
    assert level == "error"
    assert "training-token budget" in text
    assert not Job.objects.for_organization(alice.organization).exists()


def test_a_tampered_delivery_is_refused(alice: Person, engagement: Engagement, ops: Client) -> None:
    from tests.support.registry import customer_model

    other = customer_model(alice, suffix="mine")
    response = ops.post(url(engagement, "deliver"), {"model": other.pk}, follow=True)
    assert messages_of(response)[0][0] == "error"
    assert other.pk in {m["id"] for m in alice.client.get("/v1/models").json()["data"]}  # as before


def test_a_billed_milestone_cannot_be_edited_or_deleted(
    engagement: Engagement, ops: Client
) -> None:
    milestone = services.milestone_add(
        engagement=engagement, title="Paid", amount=Decimal(5), actor=actor_of(engagement.owner)
    )
    Milestone.objects.for_organization(engagement.organization_id).filter(pk=milestone.pk).update(
        status="billed", stripe_invoice_id="in_x"
    )
    html = ops.get(url(engagement)).content.decode()
    assert f'name="bill" value="{milestone.pk}"' not in html
    response = ops.post(
        url(engagement),
        {
            "title": "Support bot",
            "owner": engagement.owner_id,
            "budget_tokens": "1",
            "budget_gpu_seconds": "1",
            "budget_amount": "1",
            "milestones-TOTAL_FORMS": "1",
            "milestones-INITIAL_FORMS": "1",
            "milestones-0-id": milestone.pk,
            "milestones-0-engagement": engagement.pk,
            "milestones-0-title": "Changed",
            "milestones-0-amount": "1",
            "milestones-0-DELETE": "on",
            "events-TOTAL_FORMS": "0",
            "events-INITIAL_FORMS": "0",
        },
    )
    assert response.status_code == 200  # refused: the form again
    stored = Milestone.objects.for_organization(engagement.organization_id).get()
    assert (stored.title, stored.status) == ("Paid", "billed")


# --- the list -----------------------------------------------------------------------------


def _busy(person: Person, staff: User, n: int) -> None:
    for i in range(n):
        engagement = activated(engagement_for(person, owner=staff, title=f"Project {i}"))
        services.milestone_add(
            engagement=engagement, title=f"M{i}", amount=Decimal(10), actor=actor_of(staff)
        )
        ledger_append(
            organization_id=person.organization.pk,
            idempotency_key=f"test:{engagement.pk}",
            meter=Meter.TRAINING_TOKENS,
            quantity=250_000,
            occurred_at=engagement.created_at,
            source="test",
            model=TINY_LLAMA,
            engagement_id=engagement.pk,
        )


def _list_queries(client: Client) -> int:
    with CaptureQueriesContext(connection) as queries:
        assert client.get(LIST).status_code == 200
    return len(queries)


def test_the_list_costs_the_same_queries_for_one_engagement_or_many(
    alice: Person, charlie: Person, staff: User, ops: Client
) -> None:
    _busy(alice, staff, 1)
    _list_queries(ops)  # the session and content types are read on the first request
    one = _list_queries(ops)
    _busy(charlie, staff_member("other@atelier.test"), 6)
    assert _list_queries(ops) == one


def test_the_list_answers_whose_where_who_how_much_and_what_next(
    alice: Person, staff: User, ops: Client
) -> None:
    _busy(alice, staff, 1)  # 250k of the 1M tokens budgeted: 25%
    html = ops.get(LIST).content.decode()
    assert "Project 0" in html
    assert "Acme" in html
    assert "active" in html
    assert staff.email in html
    assert "25%" in html
    assert "M0" in html
    assert "Project 0" in ops.get(LIST, {"q": "Acme"}).content.decode()
    assert "Project 0" not in ops.get(LIST, {"status__exact": "lead"}).content.decode()
    assert "Project 0" in ops.get(LIST, {"budget": "spent"}).content.decode()
