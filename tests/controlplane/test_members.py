from __future__ import annotations

import re

import pytest
from django.core import mail
from rest_framework.test import APIClient

from controlplane.tenancy.models import Membership
from tests.support.people import PASSWORD, Person, client_with, join

pytestmark = pytest.mark.django_db(transaction=False)


def invite(person: Person, email: str, role: str = "developer") -> dict[str, object]:
    response = person.client.post(
        "/v1/organization/members", {"email": email, "role": role}, format="json"
    )
    assert response.status_code == 201, response.content
    return response.json()


def emailed_token(
    django_capture_on_commit_callbacks: object, person: Person, email: str, role: str = "developer"
) -> str:
    with django_capture_on_commit_callbacks(execute=True):  # type: ignore[operator]
        invite(person, email, role)
    message = mail.outbox[-1]
    assert message.to == [email]
    match = re.search(r"(inv_[A-Za-z0-9_\-]+)", message.body)
    assert match
    return match.group(1)


def accept(token: str, password: str = PASSWORD) -> object:
    return APIClient().post(
        "/v1/invitations/accept", {"token": token, "password": password}, format="json"
    )


def test_owner_invites_and_the_invitee_joins_with_a_working_key(
    alice: Person, django_capture_on_commit_callbacks: object
) -> None:
    token = emailed_token(django_capture_on_commit_callbacks, alice, "erin@acme.test", "viewer")

    response = accept(token)

    assert response.status_code == 201, response.content
    body = response.json()
    assert body["member"]["role"] == "viewer"
    assert body["member"]["email"] == "erin@acme.test"
    me = client_with(body["api_key"]["value"]).get("/v1/me").json()
    assert me["organization"]["id"] == alice.organization.pk
    assert "organization.write" not in me["scopes"]
    assert "models.read" in me["scopes"]
    emails = [m["email"] for m in alice.client.get("/v1/organization/members").json()["data"]]
    assert "erin@acme.test" in emails
    assert alice.client.get("/v1/organization/invites").json()["data"][0]["status"] == "accepted"


def test_invitation_token_is_never_in_the_api_response(alice: Person) -> None:
    body = invite(alice, "frank@acme.test")
    assert not any("inv_" in str(v) for v in body.values() if v != body["id"])


def test_invitation_can_be_used_once(
    alice: Person, django_capture_on_commit_callbacks: object
) -> None:
    token = emailed_token(django_capture_on_commit_callbacks, alice, "gina@acme.test")
    assert accept(token).status_code == 201
    again = accept(token)
    assert again.status_code == 404
    assert again.json()["error"]["code"] == "invalid_invitation"


def test_existing_user_must_prove_their_password_to_accept(
    alice: Person, charlie: Person, django_capture_on_commit_callbacks: object
) -> None:
    token = emailed_token(django_capture_on_commit_callbacks, alice, charlie.user.email)

    wrong = accept(token, "not the password at all")
    right = accept(token)

    assert wrong.status_code == 401
    assert right.status_code == 201
    assert (
        Membership.objects.for_organization(alice.organization).filter(user=charlie.user).exists()
    )


def test_revoked_invitation_cannot_be_accepted(
    alice: Person, django_capture_on_commit_callbacks: object
) -> None:
    with django_capture_on_commit_callbacks(execute=True):  # type: ignore[operator]
        created = invite(alice, "hank@acme.test")
    token = re.search(r"(inv_[A-Za-z0-9_\-]+)", mail.outbox[-1].body).group(1)  # type: ignore[union-attr]

    assert alice.client.delete(f"/v1/organization/invites/{created['id']}").status_code == 200
    assert accept(token).status_code == 404


def test_garbage_token_is_404(db: None) -> None:
    assert accept("inv_nope").status_code == 404


def test_inviting_a_member_or_a_pending_email_is_409(alice: Person, bob: Person) -> None:
    invite(alice, "ivy@acme.test")
    assert (
        alice.client.post(
            "/v1/organization/members", {"email": "IVY@acme.test"}, format="json"
        ).status_code
        == 409
    )
    assert (
        alice.client.post(
            "/v1/organization/members", {"email": bob.user.email}, format="json"
        ).status_code
        == 409
    )


def test_developer_cannot_invite(bob: Person) -> None:
    response = bob.client.post("/v1/organization/members", {"email": "x@acme.test"}, format="json")
    assert response.status_code == 403


def test_admin_cannot_create_owners(alice: Person) -> None:
    admin = join(alice.organization, "adam@acme.test", "admin")
    response = admin.client.post(
        "/v1/organization/members", {"email": "o@acme.test", "role": "owner"}, format="json"
    )
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "insufficient_role"


def test_owner_changes_roles(alice: Person, bob: Person) -> None:
    response = alice.client.patch(
        f"/v1/organization/members/{bob.membership.pk}", {"role": "billing"}, format="json"
    )

    assert response.status_code == 200
    assert response.json()["role"] == "billing"
    assert "billing.read" in bob.client.get("/v1/me").json()["scopes"]


def test_admin_cannot_demote_an_owner(alice: Person) -> None:
    admin = join(alice.organization, "adam@acme.test", "admin")
    response = admin.client.patch(
        f"/v1/organization/members/{alice.membership.pk}", {"role": "viewer"}, format="json"
    )
    assert response.status_code == 403
    alice.membership.refresh_from_db()
    assert alice.membership.role == "owner"


def test_admin_cannot_promote_themselves_to_owner(alice: Person) -> None:
    admin = join(alice.organization, "adam@acme.test", "admin")

    response = admin.client.patch(
        f"/v1/organization/members/{admin.membership.pk}", {"role": "owner"}, format="json"
    )

    assert response.status_code == 403
    assert response.json()["error"]["code"] == "insufficient_role"
    admin.membership.refresh_from_db()
    assert admin.membership.role == "admin"


def test_a_key_bound_to_an_admin_by_the_owner_acts_as_that_admin_only(alice: Person) -> None:
    """The owner may bind a key to an admin; holding it is being that admin, not owner."""
    admin = join(alice.organization, "adam@acme.test", "admin")
    created = alice.client.post(
        "/v1/organization/api_keys",
        {"name": "for adam", "member_id": admin.membership.pk},
        format="json",
    )
    assert created.status_code == 201
    as_admin = client_with(created.json()["value"])

    demote = as_admin.patch(
        f"/v1/organization/members/{alice.membership.pk}", {"role": "viewer"}, format="json"
    )

    assert demote.status_code == 403
    alice.membership.refresh_from_db()
    assert alice.membership.role == "owner"


def test_last_owner_cannot_be_demoted_or_removed(alice: Person) -> None:
    url = f"/v1/organization/members/{alice.membership.pk}"

    demote = alice.client.patch(url, {"role": "admin"}, format="json")
    remove = alice.client.delete(url)

    assert demote.status_code == 409
    assert demote.json()["error"]["code"] == "last_owner"
    assert remove.status_code == 409
    assert remove.json()["error"]["code"] == "last_owner"


def test_an_owner_can_leave_once_there_is_another(alice: Person, bob: Person) -> None:
    alice.client.patch(
        f"/v1/organization/members/{bob.membership.pk}", {"role": "owner"}, format="json"
    )

    response = alice.client.delete(f"/v1/organization/members/{alice.membership.pk}")

    assert response.status_code == 200
    # Alice's member-bound keys went with her membership.
    assert alice.client.get("/v1/me").status_code == 401


def test_removed_member_loses_access_at_once(alice: Person, bob: Person) -> None:
    assert bob.client.get("/v1/me").status_code == 200

    assert alice.client.delete(f"/v1/organization/members/{bob.membership.pk}").status_code == 200

    assert bob.client.get("/v1/me").status_code == 401
    entry = alice.client.get("/v1/organization/audit_logs?action=member.removed").json()["data"][0]
    assert entry["details"]["user_id"] == bob.user.pk
    assert entry["details"]["deleted_api_key_ids"]


@pytest.mark.parametrize("body", [{"role": "emperor"}, {"role": ""}, {}, {"role": ["owner"]}])
def test_bad_role_is_400(alice: Person, bob: Person, body: dict[str, object]) -> None:
    response = alice.client.patch(
        f"/v1/organization/members/{bob.membership.pk}", body, format="json"
    )
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "role"


def test_organization_can_be_renamed_and_become_a_data_partner(alice: Person) -> None:
    response = alice.client.patch(
        "/v1/organization",
        {"name": "Acme Labs", "kinds": ["customer", "data_partner"]},
        format="json",
    )
    assert response.status_code == 200
    assert response.json()["kinds"] == ["customer", "data_partner"]
    assert alice.client.get("/v1/organization").json()["name"] == "Acme Labs"


@pytest.mark.parametrize("field", ["id", "organization", "is_staff", "owner"])
def test_organization_mass_assignment_is_refused(alice: Person, field: str) -> None:
    response = alice.client.patch("/v1/organization", {field: "x"}, format="json")
    assert response.status_code == 400
    assert response.json()["error"]["param"] == field


def test_developer_cannot_rename_the_organization(bob: Person) -> None:
    assert bob.client.patch("/v1/organization", {"name": "Mine"}, format="json").status_code == 403
