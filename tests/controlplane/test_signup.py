from __future__ import annotations

import pytest
from rest_framework.test import APIClient

from controlplane.accounts import keys
from controlplane.accounts.models import APIKey, User
from controlplane.tenancy.models import Membership, Organization
from tests.support.people import Person, client_with

pytestmark = pytest.mark.django_db

GOOD = {
    "email": "dana@initech.test",
    "password": "a long and unusual passphrase",
    "organization_name": "Initech",
}


def signup(body: object, **extra: str) -> object:
    return APIClient().post("/v1/signup", body, format="json", **extra)


def test_signup_creates_user_owned_organization_and_a_working_key() -> None:
    response = signup(GOOD)

    assert response.status_code == 201, response.content
    body = response.json()
    assert body["organization"]["name"] == "Initech"
    assert body["organization"]["kinds"] == ["customer"]
    assert body["role"] == "owner"
    value = body["api_key"]["value"]
    assert value.startswith("atl_live_")
    assert keys.parse_prefix(value) is not None
    me = client_with(value).get("/v1/me")
    assert me.status_code == 200
    assert me.json()["organization"]["id"] == body["organization"]["id"]
    assert me.json()["role"] == "owner"


def test_signup_shows_the_secret_once_and_stores_only_a_hash() -> None:
    value = signup(GOOD).json()["api_key"]["value"]
    api_key = APIKey.objects.dangerously_unscoped().get()

    assert value not in api_key.hashed_key
    assert api_key.hashed_key.startswith("sha512$$")
    listed = client_with(value).get(f"/v1/organization/api_keys/{api_key.pk}").json()
    assert "value" not in listed
    assert value not in str(listed)


def test_duplicate_email_is_409_whatever_its_case() -> None:
    assert signup(GOOD).status_code == 201

    response = signup({**GOOD, "email": "DANA@initech.test", "organization_name": "Other"})

    assert response.status_code == 409
    assert response.json()["error"]["code"] == "email_taken"
    assert response.json()["error"]["param"] == "email"
    assert Organization.objects.count() == 1


@pytest.mark.parametrize(
    ("password", "reason"),
    [
        ("short", "too short"),
        ("password1234", "too common"),
        ("84629173650192", "entirely numeric"),
        ("dana@initech.test", "too similar"),
    ],
)
def test_weak_password_is_400_with_the_reason(password: str, reason: str) -> None:
    response = signup({**GOOD, "password": password})

    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "weak_password"
    assert error["param"] == "password"
    assert reason in error["message"]
    assert not User.objects.exists()


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"password": GOOD["password"], "organization_name": "X"}, "email"),
        ({**GOOD, "email": "not-an-email"}, "email"),
        ({**GOOD, "organization_name": ""}, "organization_name"),
        ({**GOOD, "organization_name": "x" * 201}, "organization_name"),
        ({**GOOD, "kinds": ["reseller"]}, "kinds"),
        ({**GOOD, "email": ["a@b.test"]}, "email"),
    ],
)
def test_malformed_signup_is_400_naming_the_field(body: dict[str, object], param: str) -> None:
    response = signup(body)

    assert response.status_code == 400
    assert response.json()["error"]["param"].startswith(param)
    assert not User.objects.exists()


@pytest.mark.parametrize("field", ["organization", "role", "is_staff", "is_superuser"])
def test_mass_assignment_at_signup_is_refused(field: str) -> None:
    response = signup({**GOOD, field: True})

    assert response.status_code == 400
    assert response.json()["error"]["param"] == field
    assert not User.objects.filter(is_staff=True).exists()


def test_signup_can_make_a_data_partner() -> None:
    body = signup({**GOOD, "kinds": ["customer", "data_partner"]}).json()

    assert body["organization"]["kinds"] == ["customer", "data_partner"]


def test_signup_is_throttled_per_ip() -> None:
    from controlplane.accounts.apis import SignupApi

    rate = SignupApi.throttle_classes[0]().THROTTLE_RATES["signup"]
    allowed = int(rate.split("/")[0])
    for i in range(allowed):
        assert signup({**GOOD, "email": f"u{i}@x.test"}, REMOTE_ADDR="10.0.0.1").status_code == 201

    blocked = signup({**GOOD, "email": "late@x.test"}, REMOTE_ADDR="10.0.0.1")
    other_ip = signup({**GOOD, "email": "other@x.test"}, REMOTE_ADDR="10.0.0.2")

    assert blocked.status_code == 429
    assert blocked.json()["error"]["code"] == "rate_limit_exceeded"
    assert blocked.json()["error"]["type"] == "rate_limit_error"
    assert int(blocked["Retry-After"]) > 0
    assert other_ip.status_code == 201


def test_spoofed_forwarded_for_does_not_reset_the_throttle() -> None:
    from controlplane.accounts.apis import SignupApi

    allowed = int(SignupApi.throttle_classes[0]().THROTTLE_RATES["signup"].split("/")[0])
    for i in range(allowed):
        signup({**GOOD, "email": f"s{i}@x.test"}, HTTP_X_FORWARDED_FOR=f"203.0.113.{i}")

    response = signup({**GOOD, "email": "s-late@x.test"}, HTTP_X_FORWARDED_FOR="198.51.100.7")

    assert response.status_code == 429


def test_signup_writes_the_audit_log(alice: Person) -> None:
    actions = set(alice.organization.auditlogs.values_list("action", flat=True))
    assert {"organization.created", "api_key.created"} <= actions
    assert Membership.objects.for_organization(alice.organization).get().role == "owner"
