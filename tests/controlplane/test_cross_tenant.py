"""Tenants never see each other: a foreign id is a 404, exactly like a missing one."""

from __future__ import annotations

import re

import pytest
from django.urls import URLPattern, URLResolver, get_resolver

from tests.support.cross_tenant import (
    BODY_REFERENCES,
    ENDPOINTS,
    OWNER_ONLY,
    BodyReference,
    Endpoint,
    OwnerOnly,
)
from tests.support.people import Person

pytestmark = pytest.mark.django_db

CASES = [(e, m) for e in ENDPOINTS for m in e.methods]


def _call(person: Person, method: str, path: str, body: dict[str, object]) -> object:
    return getattr(person.client, method.lower())(path, body or None, format="json")


@pytest.mark.parametrize(("endpoint", "method"), CASES, ids=[f"{m} {e.path}" for e, m in CASES])
def test_outsider_gets_404_for_a_foreign_id(
    alice: Person, charlie: Person, endpoint: Endpoint, method: str
) -> None:
    foreign = endpoint.make(charlie)
    before = charlie.client.get(endpoint.state_url(foreign))

    response = _call(alice, method, endpoint.url(foreign), endpoint.body)
    ids = (foreign,) if isinstance(foreign, str) else foreign
    missing = _call(alice, method, endpoint.url(tuple(i[:-4] + "zzzz" for i in ids)), endpoint.body)

    assert response.status_code == 404, response.content
    assert response.json()["error"]["type"] == "invalid_request_error"
    # Indistinguishable from an id that does not exist (only the echoed id differs).
    assert missing.status_code == 404
    assert response.json()["error"]["code"] == missing.json()["error"]["code"]
    after = charlie.client.get(endpoint.state_url(foreign))
    assert after.status_code == 200
    assert after.json() == before.json()  # nothing changed in the victim's organization


@pytest.mark.parametrize("reference", BODY_REFERENCES, ids=lambda r: f"{r.method} {r.path}")
def test_outsider_gets_404_for_a_foreign_id_in_a_body(
    alice: Person, charlie: Person, reference: BodyReference
) -> None:
    response = _call(alice, reference.method, reference.url_for(alice), reference.body(charlie))
    assert response.status_code == 404, response.content


def test_foreign_ids_in_list_filters_find_nothing(alice: Person, charlie: Person) -> None:
    body = alice.client.get(f"/v1/organization/audit_logs?actor_id={charlie.user.pk}").json()
    assert body["data"] == []


def _id_bearing_routes() -> set[str]:
    found: set[str] = set()

    def walk(patterns: list[URLPattern | URLResolver], prefix: str) -> None:
        for p in patterns:
            route = prefix + str(p.pattern)
            if isinstance(p, URLResolver):
                walk(p.url_patterns, route)
            elif "<" in route and route.startswith("v1/"):
                found.add("/" + re.sub(r"<[^>]+>", "{id}", route))

    walk(get_resolver().url_patterns, "")
    return found


def test_every_id_bearing_endpoint_is_in_the_cross_tenant_registry() -> None:
    assert _id_bearing_routes() == {e.path for e in ENDPOINTS}


@pytest.mark.parametrize("case", OWNER_ONLY, ids=lambda c: f"{c.method} {c.path}")
def test_admin_gets_403_for_the_owners_keys_and_membership(alice: Person, case: OwnerOnly) -> None:
    from tests.support.people import join

    admin = join(alice.organization, "adam@acme.test", "admin")
    path = case.path.replace("{id}", case.make(alice))
    before = _organization_state(alice)

    response = _call(admin, case.method, path, case.body(alice))

    assert response.status_code == 403, response.content  # type: ignore[attr-defined]
    error = response.json()["error"]  # type: ignore[attr-defined]
    assert (error["type"], error["code"]) == ("permission_error", "insufficient_role")
    assert "'owner'" in error["message"]
    assert _organization_state(alice) == before


def _organization_state(owner: Person) -> list[object]:
    """Keys, members, the owner's identity and each key's limits, without `last_used_at`
    (every call moves the caller's own)."""
    keys = owner.client.get("/v1/organization/api_keys?limit=100").json()["data"]
    return [
        [{k: v for k, v in key.items() if k != "last_used_at"} for key in keys],
        owner.client.get("/v1/organization/members?limit=100").json()["data"],
        owner.client.get("/v1/me").json(),
        [owner.client.get(f"/v1/organization/api_keys/{key['id']}/limits").json() for key in keys],
    ]
