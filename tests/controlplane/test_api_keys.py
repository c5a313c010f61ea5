from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from controlplane.accounts import keys, services
from controlplane.accounts.authentication import Principal, principal_for
from controlplane.accounts.models import APIKey
from controlplane.core.errors import MissingScope
from controlplane.tenancy.models import Membership
from tests.support.people import SYSTEM, Person, client_with, join

pytestmark = pytest.mark.django_db


def create_key(person: Person, **body: object) -> dict[str, object]:
    response = person.client.post(
        "/v1/organization/api_keys", {"name": "ci", **body}, format="json"
    )
    assert response.status_code == 201, response.content
    return response.json()


# --- format -------------------------------------------------------------------------------


def test_key_has_prefix_and_a_checksum_secret_scanners_can_verify() -> None:
    new = keys.generate()

    assert new.key.startswith("atl_live_")
    assert keys.parse_prefix(new.key) == new.prefix
    body, check = new.key[:-6], new.key[-6:]
    assert keys.checksum(body) == check
    # One changed character anywhere breaks the checksum.
    flipped = new.key[:20] + ("A" if new.key[20] != "A" else "B") + new.key[21:]
    assert keys.parse_prefix(flipped) is None


def test_verification_uses_a_fast_hash_not_a_password_hasher() -> None:
    new = keys.generate()

    assert new.hashed.startswith("sha512$$")
    assert keys.verify(new.key, new.hashed)
    assert not keys.verify(keys.generate().key, new.hashed)


# --- create / list / retrieve -------------------------------------------------------------


def test_owner_creates_lists_and_retrieves_keys(alice: Person) -> None:
    created = create_key(alice, scopes=["inference", "models.read"])

    assert created["scopes"] == ["inference", "models.read"]
    assert created["member_id"] == alice.membership.pk
    assert str(created["value"]).startswith("atl_live_")
    listed = alice.client.get("/v1/organization/api_keys").json()
    assert listed["object"] == "list"
    assert {k["id"] for k in listed["data"]} >= {created["id"]}
    assert all("value" not in k for k in listed["data"])
    one = alice.client.get(f"/v1/organization/api_keys/{created['id']}").json()
    assert one["redacted_value"].startswith("atl_live_")
    assert "…" in one["redacted_value"]


def test_list_is_cursor_paginated(alice: Person) -> None:
    for i in range(4):
        create_key(alice, name=f"k{i}")
    first = alice.client.get("/v1/organization/api_keys?limit=2").json()
    second = alice.client.get(f"/v1/organization/api_keys?limit=2&after={first['last_id']}").json()
    rest = alice.client.get(f"/v1/organization/api_keys?limit=2&after={second['last_id']}").json()

    ids = [k["id"] for page in (first, second, rest) for k in page["data"]]
    assert len(ids) == 5
    assert len(set(ids)) == 5
    assert first["has_more"]
    assert second["has_more"]
    assert not rest["has_more"]


@pytest.mark.parametrize("limit", ["0", "101", "ten"])
def test_bad_limit_is_400(alice: Person, limit: str) -> None:
    response = alice.client.get(f"/v1/organization/api_keys?limit={limit}")
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "limit"


def test_unknown_scope_is_400(alice: Person) -> None:
    response = alice.client.post(
        "/v1/organization/api_keys", {"name": "x", "scopes": ["root"]}, format="json"
    )
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_scope"


def test_a_key_cannot_mint_a_stronger_key(alice: Person) -> None:
    admin_only = create_key(alice, scopes=["admin"])

    response = client_with(str(admin_only["value"])).post(
        "/v1/organization/api_keys", {"name": "x", "scopes": ["all"]}, format="json"
    )

    assert response.status_code == 400
    assert response.json()["error"]["code"] == "scope_escalation"


def test_developer_key_is_bounded_by_the_role(bob: Person) -> None:
    me = bob.client.get("/v1/me").json()

    assert "organization.write" not in me["scopes"]
    assert "inference" in me["scopes"]
    response = bob.client.post("/v1/organization/api_keys", {"name": "x"}, format="json")
    assert response.status_code == 403
    assert "organization.write" in response.json()["error"]["message"]


def test_service_account_key_has_no_member_and_survives_member_changes(alice: Person) -> None:
    created = create_key(alice, service_account=True, scopes=["inference"])

    assert created["member_id"] is None
    assert created["owner"] == {"type": "service_account", "id": None}
    me = client_with(str(created["value"])).get("/v1/me").json()
    assert me["role"] is None
    assert me["scopes"] == ["inference"]


def test_owner_can_create_a_key_for_a_teammate(alice: Person, bob: Person) -> None:
    created = create_key(alice, member_id=bob.membership.pk, scopes=["all"])

    me = client_with(str(created["value"])).get("/v1/me").json()
    assert me["member_id"] == bob.membership.pk
    assert "organization.write" not in me["scopes"]  # bob's role caps the key


# --- a key acts as its member: only someone who may manage that member's role manages it ---


def _key_of(person: Person) -> APIKey:
    return APIKey.objects.for_organization(person.organization).get(member=person.membership)


def _principal(person: Person) -> Principal:
    return principal_for(_key_of(person))


def test_admin_cannot_bind_a_key_to_the_owner(alice: Person) -> None:
    admin = join(alice.organization, "adam@acme.test", "admin")

    response = admin.client.post(
        "/v1/organization/api_keys",
        {"name": "x", "member_id": alice.membership.pk, "scopes": ["all"]},
        format="json",
    )

    assert response.status_code == 403
    error = _error(response)
    assert error["type"] == "permission_error"
    assert error["code"] == "insufficient_role"
    assert error["param"] == "member_id"
    assert "'owner'" in str(error["message"])
    assert "Omit 'member_id'" in str(error["message"])  # says what to change
    assert (
        APIKey.objects.for_organization(alice.organization).filter(member=alice.membership).count()
        == 1
    )  # only alice's own first key


def test_admin_cannot_rotate_rename_or_revoke_the_owners_key(alice: Person) -> None:
    admin = join(alice.organization, "adam@acme.test", "admin")
    owners_key = _key_of(alice)
    url = f"/v1/organization/api_keys/{owners_key.pk}"

    rotate = admin.client.post(f"{url}/rotate", {"grace_period_seconds": 0}, format="json")
    rename = admin.client.patch(url, {"name": "mine now"}, format="json")
    revoke = admin.client.delete(url)

    for response in (rotate, rename, revoke):
        assert response.status_code == 403, response.content
        assert _error(response)["code"] == "insufficient_role"
        assert "'owner'" in str(_error(response)["message"])
    owners_key.refresh_from_db()
    assert (owners_key.rotated_at, owners_key.revoked_at, owners_key.name) == (
        None,
        None,
        "Default key",
    )
    assert alice.client.get("/v1/me").status_code == 200
    # Reading it is fine: it is in the admin's own organization.
    assert admin.client.get(url).status_code == 200


def test_admin_cannot_take_over_the_organization_through_the_owners_key(alice: Person) -> None:
    admin = join(alice.organization, "adam@acme.test", "admin")
    owners_key = _key_of(alice)

    bound = admin.client.post(
        "/v1/organization/api_keys",
        {"name": "x", "member_id": alice.membership.pk},
        format="json",
    )
    rotated = admin.client.post(f"/v1/organization/api_keys/{owners_key.pk}/rotate")
    stolen = [r.json()["value"] for r in (bound, rotated) if r.status_code == 201]
    # Then act with whatever was obtained: promote self, demote the real owner.
    for client in [admin.client, *(client_with(value) for value in stolen)]:
        client.patch(
            f"/v1/organization/members/{admin.membership.pk}", {"role": "owner"}, format="json"
        )
        client.patch(
            f"/v1/organization/members/{alice.membership.pk}", {"role": "viewer"}, format="json"
        )

    assert (bound.status_code, rotated.status_code) == (403, 403)
    assert stolen == []
    roles = dict(Membership.objects.for_organization(alice.organization).values_list("pk", "role"))
    assert roles == {alice.membership.pk: "owner", admin.membership.pk: "admin"}
    assert client_with(alice.key).get("/v1/me").json()["role"] == "owner"


def test_a_service_key_cannot_bind_a_key_to_the_owner(alice: Person) -> None:
    service = client_with(str(create_key(alice, service_account=True, scopes=["all"])["value"]))

    response = service.post(
        "/v1/organization/api_keys",
        {"name": "x", "member_id": alice.membership.pk},
        format="json",
    )

    assert response.status_code == 403
    assert _error(response)["code"] == "insufficient_role"


def test_a_foreign_member_id_stays_404_for_an_admin(alice: Person, charlie: Person) -> None:
    admin = join(alice.organization, "adam@acme.test", "admin")

    response = admin.client.post(
        "/v1/organization/api_keys",
        {"name": "x", "member_id": charlie.membership.pk},
        format="json",
    )

    assert response.status_code == 404  # a foreign member stays invisible, never a 403


def test_owner_can_bind_a_key_to_an_admin(alice: Person) -> None:
    admin = join(alice.organization, "adam@acme.test", "admin")

    created = create_key(alice, member_id=admin.membership.pk, scopes=["all"])

    me = client_with(str(created["value"])).get("/v1/me").json()
    assert (me["member_id"], me["role"]) == (admin.membership.pk, "admin")


def test_admin_can_bind_rotate_and_revoke_a_developers_key(alice: Person, bob: Person) -> None:
    admin = join(alice.organization, "adam@acme.test", "admin")

    created = create_key(admin, member_id=bob.membership.pk, scopes=["inference"])
    rotated = admin.client.post(
        f"/v1/organization/api_keys/{created['id']}/rotate",
        {"grace_period_seconds": 0},
        format="json",
    )
    bobs_first = APIKey.objects.for_organization(alice.organization).get(
        prefix=keys.parse_prefix(bob.key)
    )
    revoked = admin.client.delete(f"/v1/organization/api_keys/{bobs_first.pk}")

    assert rotated.status_code == 201
    # The new key still acts for bob, never for the admin who rotated it.
    assert rotated.json()["member_id"] == bob.membership.pk
    me = client_with(rotated.json()["value"]).get("/v1/me").json()
    assert (me["member_id"], me["role"]) == (bob.membership.pk, "developer")
    assert revoked.status_code == 200


def test_an_admin_binds_rotates_and_revokes_their_own_keys(alice: Person) -> None:
    admin = join(alice.organization, "adam@acme.test", "admin")

    created = create_key(admin, member_id=admin.membership.pk)
    rotated = admin.client.post(f"/v1/organization/api_keys/{created['id']}/rotate")

    assert rotated.status_code == 201
    assert rotated.json()["member_id"] == admin.membership.pk
    revoked = client_with(rotated.json()["value"]).delete(
        f"/v1/organization/api_keys/{rotated.json()['id']}"
    )
    assert revoked.status_code == 200


def test_any_member_may_bind_a_key_to_themselves(alice: Person) -> None:
    """Below admin no role holds `organization.write`, so the API refuses them on scope
    first; the rule itself lets every member bind keys to themselves."""
    for role in ("owner", "admin", "developer", "billing", "viewer"):
        member = join(alice.organization, f"{role}@acme.test", role)
        issued = services.api_key_create(
            principal=_principal(member),
            name="mine",
            scopes=["models.read"],
            member=member.membership,
            expires_at=None,
            actor=SYSTEM,
        )

        assert issued.api_key.member_id == member.membership.pk


def test_a_developer_may_not_bind_a_key_to_another_developer(alice: Person, bob: Person) -> None:
    dana = join(alice.organization, "dana@acme.test", "developer")

    with pytest.raises(MissingScope, match="'developer'"):
        services.api_key_create(
            principal=_principal(bob),
            name="x",
            scopes=["models.read"],
            member=dana.membership,
            expires_at=None,
            actor=SYSTEM,
        )


def test_expiry_in_the_past_is_400(alice: Person) -> None:
    past = (timezone.now() - timedelta(minutes=1)).isoformat()
    response = alice.client.post(
        "/v1/organization/api_keys", {"name": "x", "expires_at": past}, format="json"
    )
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "expires_at"


def test_rename_a_key(alice: Person) -> None:
    created = create_key(alice)
    response = alice.client.patch(
        f"/v1/organization/api_keys/{created['id']}", {"name": "renamed"}, format="json"
    )
    assert response.status_code == 200
    assert response.json()["name"] == "renamed"


def test_renaming_cannot_touch_scopes(alice: Person) -> None:
    created = create_key(alice, scopes=["inference"])
    response = alice.client.patch(
        f"/v1/organization/api_keys/{created['id']}",
        {"name": "x", "scopes": ["all"]},
        format="json",
    )
    assert response.status_code == 400
    assert APIKey.objects.for_organization(alice.organization).get(pk=created["id"]).scopes == [
        "inference"
    ]


# --- authentication failures: 401 ----------------------------------------------------------


def _error(response: object) -> dict[str, object]:
    return response.json()["error"]  # type: ignore[attr-defined, no-any-return]


def test_missing_key_is_401_with_a_bearer_challenge(db: None) -> None:
    response = client_with(None).get("/v1/me")

    assert response.status_code == 401
    assert _error(response)["code"] == "missing_api_key"
    assert response["WWW-Authenticate"].startswith("Bearer")


@pytest.mark.parametrize(
    "header",
    [
        "Bearer",
        "Bearer ",
        "Basic dXNlcjpwYXNz",
        "Token atl_live_x",
        "Bearer not-a-key",
        "Bearer atl_live_AAAAAAAA_" + "a" * 46,
    ],
)
def test_malformed_authorization_is_401(alice: Person, header: str) -> None:
    from rest_framework.test import APIClient

    response = APIClient().get("/v1/me", HTTP_AUTHORIZATION=header)
    assert response.status_code == 401
    assert _error(response)["type"] == "invalid_request_error"


def test_unknown_but_well_formed_key_is_401(db: None) -> None:
    response = client_with(keys.generate().key).get("/v1/me")
    assert response.status_code == 401
    assert _error(response)["message"] == "Incorrect API key provided."


def test_a_key_with_the_right_prefix_but_wrong_secret_is_401(alice: Person) -> None:
    prefix = keys.parse_prefix(alice.key)
    body = f"atl_live_{prefix}_" + "Z" * 40
    forged = body + keys.checksum(body)

    response = client_with(forged).get("/v1/me")

    assert response.status_code == 401
    assert _error(response)["message"] == "Incorrect API key provided."


def test_revoked_key_is_401(alice: Person) -> None:
    created = create_key(alice)
    value = str(created["value"])
    assert client_with(value).get("/v1/me").status_code == 200

    deleted = alice.client.delete(f"/v1/organization/api_keys/{created['id']}")

    assert deleted.status_code == 200
    assert deleted.json()["deleted"] is True
    response = client_with(value).get("/v1/me")
    assert response.status_code == 401
    assert _error(response)["code"] == "api_key_revoked"
    # Revoking twice is harmless.
    assert alice.client.delete(f"/v1/organization/api_keys/{created['id']}").status_code == 200


def test_expired_key_is_401(alice: Person) -> None:
    created = create_key(alice, expires_at=(timezone.now() + timedelta(hours=1)).isoformat())
    APIKey.objects.for_organization(alice.organization).filter(pk=created["id"]).update(
        expires_at=timezone.now() - timedelta(seconds=1)
    )

    response = client_with(str(created["value"])).get("/v1/me")

    assert response.status_code == 401
    assert _error(response)["code"] == "api_key_expired"


@pytest.mark.parametrize("param", ["api_key", "key", "access_token", "token"])
def test_keys_in_query_strings_are_refused_even_with_a_valid_header(
    alice: Person, param: str
) -> None:
    response = alice.client.get(f"/v1/me?{param}={alice.key}")

    assert response.status_code == 401
    assert _error(response)["code"] == "api_key_in_url"


def test_a_key_pasted_into_any_query_parameter_is_refused(alice: Person) -> None:
    response = client_with(None).get(f"/v1/me?q={alice.key}")
    assert response.status_code == 401
    assert _error(response)["code"] == "api_key_in_url"


def test_key_of_a_deactivated_user_is_401(alice: Person, bob: Person) -> None:
    bob.user.is_active = False
    bob.user.save()

    assert bob.client.get("/v1/me").status_code == 401


# --- rotation -------------------------------------------------------------------------------


def test_rotation_issues_a_new_key_and_the_old_one_works_for_the_grace_period(
    alice: Person,
) -> None:
    created = create_key(alice, scopes=["inference"])
    old = str(created["value"])

    response = alice.client.post(
        f"/v1/organization/api_keys/{created['id']}/rotate",
        {"grace_period_seconds": 3600},
        format="json",
    )

    assert response.status_code == 201
    new = response.json()
    assert new["value"] != old
    assert new["scopes"] == ["inference"]
    assert client_with(new["value"]).get("/v1/me").status_code == 200
    assert client_with(old).get("/v1/me").status_code == 200
    old_row = alice.client.get(f"/v1/organization/api_keys/{created['id']}").json()
    assert old_row["status"] == "rotating"
    assert old_row["rotated_to"] == new["id"]
    assert 3590 <= old_row["expires_at"] - old_row["rotated_at"] <= 3600


def test_rotated_key_stops_after_its_grace_period(alice: Person) -> None:
    created = create_key(alice)
    old = str(created["value"])
    alice.client.post(
        f"/v1/organization/api_keys/{created['id']}/rotate",
        {"grace_period_seconds": 60},
        format="json",
    )
    APIKey.objects.for_organization(alice.organization).filter(pk=created["id"]).update(
        expires_at=timezone.now() - timedelta(seconds=1)
    )

    response = client_with(old).get("/v1/me")

    assert response.status_code == 401
    assert _error(response)["code"] == "api_key_rotated"
    assert (
        alice.client.get("/v1/organization/api_keys?status=expired").json()["data"][0]["id"]
        == created["id"]
    )


def test_rotation_with_zero_grace_ends_the_old_key_now(alice: Person) -> None:
    created = create_key(alice)
    alice.client.post(
        f"/v1/organization/api_keys/{created['id']}/rotate",
        {"grace_period_seconds": 0},
        format="json",
    )
    assert client_with(str(created["value"])).get("/v1/me").status_code == 401


def test_default_grace_period_is_a_day(alice: Person, settings: object) -> None:
    created = create_key(alice)
    new = alice.client.post(f"/v1/organization/api_keys/{created['id']}/rotate").json()
    old_row = alice.client.get(f"/v1/organization/api_keys/{created['id']}").json()
    assert old_row["expires_at"] - old_row["rotated_at"] == 24 * 3600
    assert new["id"] != created["id"]


@pytest.mark.parametrize("grace", [-1, 8 * 24 * 3600, "soon"])
def test_bad_grace_period_is_400(alice: Person, grace: object) -> None:
    created = create_key(alice)
    response = alice.client.post(
        f"/v1/organization/api_keys/{created['id']}/rotate",
        {"grace_period_seconds": grace},
        format="json",
    )
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "grace_period_seconds"


def test_a_key_is_rotated_once_and_revoked_keys_not_at_all(alice: Person) -> None:
    created = create_key(alice)
    url = f"/v1/organization/api_keys/{created['id']}/rotate"
    assert alice.client.post(url).status_code == 201
    assert alice.client.post(url).json()["error"]["code"] == "key_already_rotated"
    other = create_key(alice)
    alice.client.delete(f"/v1/organization/api_keys/{other['id']}")
    response = alice.client.post(f"/v1/organization/api_keys/{other['id']}/rotate")
    assert response.status_code == 409


# --- last_used_at without a write per request; the key cache -------------------------------


def test_last_used_at_is_recorded_without_a_write_per_request(alice: Person) -> None:
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    client = alice.client
    client.get("/v1/me")  # first use: one write
    row = APIKey.objects.for_organization(alice.organization).get(member=alice.membership)
    assert row.last_used_at is not None

    with CaptureQueriesContext(connection) as queries:
        for _ in range(5):
            assert client.get("/v1/me").status_code == 200
    assert not [q for q in queries.captured_queries if q["sql"].startswith("UPDATE")]
    first = row.last_used_at
    row.refresh_from_db()
    assert row.last_used_at == first


def test_without_the_cache_a_request_costs_one_query(
    alice: Person, settings: object, django_assert_num_queries: object
) -> None:
    settings.API_KEY_CACHE_SECONDS = 0  # type: ignore[attr-defined]
    alice.client.get("/v1/me")

    with django_assert_num_queries(1):  # type: ignore[operator]
        alice.client.get("/v1/me")  # the key lookup only: no UPDATE


def test_cached_keys_are_served_without_the_database(alice: Person) -> None:
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from controlplane.accounts.keycache import key_cache

    deadline = timezone.now() + timedelta(seconds=10)
    while not key_cache.enabled and timezone.now() < deadline:  # listener subscribing
        alice.client.get("/v1/me")
    alice.client.get("/v1/me")

    with CaptureQueriesContext(connection) as queries:
        assert alice.client.get("/v1/me").status_code == 200
    assert queries.captured_queries == []


def test_last_used_at_moves_once_the_resolution_has_passed(alice: Person) -> None:
    from controlplane.accounts.keycache import key_cache

    alice.client.get("/v1/me")
    qs = APIKey.objects.for_organization(alice.organization).filter(member=alice.membership)
    qs.update(last_used_at=timezone.now() - timedelta(minutes=5))
    key_cache.clear()  # update() skips signals: stand in for the cache's TTL running out

    alice.client.get("/v1/me")

    assert timezone.now() - qs.get().last_used_at < timedelta(seconds=10)


def test_a_key_revoked_behind_the_caches_back_stops_once_the_ttl_since_its_read_has_passed(
    alice: Person, settings: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A lost invalidation (a failed publish) is bounded by API_KEY_CACHE_SECONDS from
    the database read, however often the cached copy is refreshed for `last_used_at`."""
    import time
    import types

    from controlplane.accounts import keycache
    from controlplane.accounts.authentication import cached_key
    from controlplane.core import ttlcache

    settings.API_KEY_CACHE_SECONDS = 60  # type: ignore[attr-defined]
    settings.API_KEY_LAST_USED_RESOLUTION_SECONDS = 0  # type: ignore[attr-defined]
    deadline = time.monotonic() + 10
    while not keycache.key_cache.enabled and time.monotonic() < deadline:  # listener subscribing
        time.sleep(0.05)
    assert keycache.key_cache.enabled
    now = [1000.0]  # the cache's clock, moved by hand: no sleeping through the TTL
    monkeypatch.setattr(ttlcache, "time", types.SimpleNamespace(monotonic=lambda: now[0]))
    keycache.key_cache.clear()
    client = alice.client
    assert client.get("/v1/me").status_code == 200  # read from the database at t=1000
    # Revoked without the signal, as if the invalidation had never reached this process.
    APIKey.objects.for_organization(alice.organization).filter(member=alice.membership).update(
        revoked_at=timezone.now()
    )

    for t in (1010.0, 1020.0, 1030.0, 1040.0, 1050.0, 1059.0):
        now[0] = t
        # Stale within the TTL (that is what the TTL allows); each use rewrites last_used_at.
        assert client.get("/v1/me").status_code == 200
    now[0] = 1060.5

    prefix = keys.parse_prefix(alice.key)
    assert prefix is not None
    assert keycache.key_cache.get(prefix) is None
    assert keycache.key_cache.peek(prefix) is None  # the shared copy (inference) too
    assert cached_key(alice.key) is None
    response = client.get("/v1/me")
    assert response.status_code == 401
    assert _error(response)["code"] == "api_key_revoked"


@pytest.mark.parametrize(
    "change",
    ["revoke", "remove_member", "demote", "deactivate_user", "rotate_now"],
)
def test_access_changes_take_effect_on_the_next_request_despite_the_cache(
    alice: Person, bob: Person, change: str
) -> None:
    key = create_key(alice, member_id=bob.membership.pk, scopes=["all"])
    client = client_with(str(key["value"]))
    for _ in range(3):
        assert "files.write" in client.get("/v1/me").json()["scopes"]

    if change == "revoke":
        alice.client.delete(f"/v1/organization/api_keys/{key['id']}")
    elif change == "remove_member":
        alice.client.delete(f"/v1/organization/members/{bob.membership.pk}")
    elif change == "demote":
        alice.client.patch(
            f"/v1/organization/members/{bob.membership.pk}", {"role": "viewer"}, format="json"
        )
    elif change == "deactivate_user":
        bob.user.is_active = False
        bob.user.save()
    elif change == "rotate_now":
        alice.client.post(
            f"/v1/organization/api_keys/{key['id']}/rotate",
            {"grace_period_seconds": 0},
            format="json",
        )

    response = client.get("/v1/me")
    if change == "demote":
        assert "files.write" not in response.json()["scopes"]
    else:
        assert response.status_code == 401


# --- scopes ---------------------------------------------------------------------------------


def test_inference_only_key_calling_a_management_endpoint_is_403_naming_the_scope(
    alice: Person,
) -> None:
    inference = create_key(alice, scopes=["inference"])

    response = client_with(str(inference["value"])).get("/v1/organization/api_keys")

    assert response.status_code == 403
    error = response.json()["error"]
    assert error["type"] == "permission_error"
    assert error["code"] == "missing_scope"
    assert "'organization.read'" in error["message"]


def test_read_only_key_can_read_but_not_write(alice: Person) -> None:
    reader = client_with(str(create_key(alice, scopes=["read_only"])["value"]))

    assert reader.get("/v1/organization/api_keys").status_code == 200
    response = reader.post("/v1/organization/api_keys", {"name": "x"}, format="json")
    assert response.status_code == 403
    assert "'organization.write'" in response.json()["error"]["message"]


@pytest.mark.parametrize("field", ["organization", "organization_id", "prefix", "hashed_key"])
def test_mass_assignment_on_key_creation_is_refused(alice: Person, field: str) -> None:
    response = alice.client.post(
        "/v1/organization/api_keys", {"name": "x", field: "org_other"}, format="json"
    )
    assert response.status_code == 400
    assert response.json()["error"]["param"] == field
