"""Every change to access is in the audit log: who, what, when, from where."""

from __future__ import annotations

import pytest
from django.test import Client

from controlplane.accounts.models import APIKey, User
from controlplane.audit.models import AuditLog
from controlplane.tenancy.models import Membership
from tests.support.people import Person, client_with

pytestmark = pytest.mark.django_db


def entries(person: Person, **filters: str) -> list[dict[str, object]]:
    query = "&".join(f"{k}={v}" for k, v in filters.items())
    response = person.client.get(f"/v1/organization/audit_logs?{query}")
    assert response.status_code == 200, response.content
    return response.json()["data"]  # type: ignore[no-any-return]


def test_key_changes_are_audited_with_actor_ip_agent_and_request_id(alice: Person) -> None:
    created = alice.client.post(
        "/v1/organization/api_keys",
        {"name": "ci"},
        format="json",
        REMOTE_ADDR="192.0.2.10",
        HTTP_USER_AGENT="deploy-bot/1.0",
        HTTP_X_REQUEST_ID="req-audit-1",
    ).json()

    entry = entries(alice, action="api_key.created", target_id=str(created["id"]))[0]

    assert entry["actor"] == {
        "type": "user",
        "id": alice.user.pk,
        "email": "alice@acme.test",
        "api_key_id": APIKey.objects.for_organization(alice.organization)
        .get(member=alice.membership, name="Default key")
        .pk,
        "ip_address": "192.0.2.10",
        "user_agent": "deploy-bot/1.0",
    }
    assert entry["request_id"] == "req-audit-1"
    assert entry["target"] == {"type": "api_key", "id": created["id"]}
    assert "value" not in str(entry["details"]) or created["value"] not in str(entry)


def test_every_access_change_leaves_an_entry(alice: Person, bob: Person) -> None:
    key = alice.client.post("/v1/organization/api_keys", {"name": "ci"}, format="json").json()
    alice.client.patch(f"/v1/organization/api_keys/{key['id']}", {"name": "ci2"}, format="json")
    alice.client.post(f"/v1/organization/api_keys/{key['id']}/rotate")
    alice.client.delete(f"/v1/organization/api_keys/{key['id']}")
    invite = alice.client.post(
        "/v1/organization/members", {"email": "z@acme.test"}, format="json"
    ).json()
    alice.client.delete(f"/v1/organization/invites/{invite['id']}")
    alice.client.patch(
        f"/v1/organization/members/{bob.membership.pk}", {"role": "viewer"}, format="json"
    )
    alice.client.patch("/v1/organization", {"name": "Acme 2"}, format="json")
    alice.client.delete(f"/v1/organization/members/{bob.membership.pk}")

    actions = {e["type"] for e in entries(alice, limit="100")}

    assert {
        "api_key.created",
        "api_key.updated",
        "api_key.rotated",
        "api_key.revoked",
        "invite.created",
        "invite.revoked",
        "member.role_changed",
        "organization.updated",
        "member.removed",
    } <= actions


def test_a_secret_never_reaches_the_audit_log(alice: Person) -> None:
    created = alice.client.post("/v1/organization/api_keys", {"name": "ci"}, format="json").json()
    rotated = alice.client.post(f"/v1/organization/api_keys/{created['id']}/rotate").json()

    dump = str(list(AuditLog.objects.for_organization(alice.organization).values()))

    assert created["value"] not in dump
    assert rotated["value"] not in dump


def test_developers_cannot_read_the_audit_log(bob: Person) -> None:
    response = bob.client.get("/v1/organization/audit_logs")
    assert response.status_code == 403
    assert "audit_logs.read" in response.json()["error"]["message"]


def test_audit_log_is_per_organization(alice: Person, charlie: Person) -> None:
    assert {e["id"] for e in entries(alice)}.isdisjoint({e["id"] for e in entries(charlie)})


# --- staff, through the Django admin ---------------------------------------------------------


@pytest.fixture
def staff() -> Client:
    user = User.objects.create_superuser(email="ops@atelier.test", password="staff pass 12345")
    client = Client()
    client.force_login(user)
    return client


@pytest.mark.parametrize(
    "page",
    [
        "/admin/tenancy/organization/?q=Acme&is_data_partner__exact=0",
        "/admin/tenancy/membership/?q=alice&role__exact=owner",
        "/admin/tenancy/invitation/?status__exact=pending",
        "/admin/accounts/apikey/?q=Default",
        "/admin/accounts/user/?q=alice",
        "/admin/audit/auditlog/?q=alice&action__exact=api_key.created",
    ],
)
def test_staff_see_tenants_members_keys_and_audit_with_search(
    staff: Client, alice: Person, bob: Person, page: str
) -> None:
    response = staff.get(page)
    assert response.status_code == 200
    assert b"0 results" not in response.content or b"invitation" in page.encode()


def test_the_admin_never_shows_a_key_secret_or_hash(staff: Client, alice: Person) -> None:
    key = APIKey.objects.for_organization(alice.organization).get()
    pages = [
        staff.get("/admin/accounts/apikey/").content,
        staff.get(f"/admin/accounts/apikey/{key.pk}/change/").content,
    ]

    for html in pages:
        assert alice.key.encode() not in html
        assert key.hashed_key.encode() not in html
        assert key.redacted_value.encode() in html


def test_staff_role_change_is_audited(staff: Client, alice: Person, bob: Person) -> None:
    url = f"/admin/tenancy/membership/{bob.membership.pk}/change/"
    response = staff.post(
        url, {"user": bob.user.pk, "organization": alice.organization.pk, "role": "admin"}
    )

    assert response.status_code == 302, response.content[:2000]
    assert (
        Membership.objects.for_organization(alice.organization).get(pk=bob.membership.pk).role
        == "admin"
    )
    entry = AuditLog.objects.for_organization(alice.organization).get(action="admin.member.changed")
    assert entry.actor_type == "staff"
    assert entry.actor_email == "ops@atelier.test"
    assert entry.details == {"role": "admin"}
    assert entry.ip_address == "127.0.0.1"


def test_staff_revoke_from_the_admin_is_audited_and_takes_effect(
    staff: Client, alice: Person
) -> None:
    key = APIKey.objects.for_organization(alice.organization).get()
    response = staff.post(
        "/admin/accounts/apikey/", {"action": "revoke_keys", "_selected_action": [key.pk]}
    )

    assert response.status_code == 302
    assert client_with(alice.key).get("/v1/me").status_code == 401
    entry = AuditLog.objects.for_organization(alice.organization).get(action="api_key.revoked")
    assert entry.actor_type == "staff"
    assert entry.actor_email == "ops@atelier.test"


def test_audit_entries_cannot_be_edited_in_the_admin(staff: Client, alice: Person) -> None:
    entry = AuditLog.objects.for_organization(alice.organization).first()
    assert entry is not None
    response = staff.post(f"/admin/audit/auditlog/{entry.pk}/change/", {"action": "forged"})
    assert response.status_code == 403
    entry.refresh_from_db()
    assert entry.action != "forged"


def test_staff_log_in_through_the_admin_login_form(db: None) -> None:
    User.objects.create_superuser(email="ops@atelier.test", password="staff pass 12345")
    client = Client()

    wrong = client.post("/admin/login/", {"username": "ops@atelier.test", "password": "nope"})
    right = client.post(
        "/admin/login/?next=/admin/",
        {"username": "ops@atelier.test", "password": "staff pass 12345"},
    )

    assert wrong.status_code == 200  # the form again, with an error
    assert right.status_code == 302
    assert right["Location"] == "/admin/"
    assert client.get("/admin/").status_code == 200


def test_customers_cannot_use_the_admin(alice: Person) -> None:
    client = Client()
    client.post("/admin/login/", {"username": "alice@acme.test", "password": "x"})
    assert client.get("/admin/").status_code == 302  # back to the login page
