"""Customers read their engagements at /v1/engagements: what they may see and nothing else."""

from __future__ import annotations

import json
from datetime import date
from decimal import Decimal

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from controlplane.audit.services import Actor
from controlplane.engagements import services
from controlplane.modelregistry.models import CustomerModel
from tests.support.engagements import actor_of, engagement_for, staff_member
from tests.support.people import Person, client_with
from tests.support.registry import customer_model

pytestmark = pytest.mark.django_db
SYSTEM = Actor(type="system")


@pytest.fixture
def engagement(alice: Person) -> object:
    staff = staff_member("olga@atelier.test")
    engagement = engagement_for(
        alice,
        owner=staff,
        owner_display_name="Olga",
        internal_notes="margin is thin; push the upsell",
        budget_amount=Decimal("987.65"),
    )
    services.milestone_add(
        engagement=engagement,
        title="Prototype",
        amount=Decimal("1500.00"),
        due_date=date(2027, 1, 15),
        actor=actor_of(staff),
    )
    services.engagement_event_add(engagement=engagement, message="Kick-off call booked.")
    return engagement


def test_a_customer_reads_their_engagement(alice: Person, engagement: object) -> None:
    body = alice.client.get(f"/v1/engagements/{engagement.pk}").json()  # type: ignore[attr-defined]

    assert body["id"] == engagement.pk  # type: ignore[attr-defined]
    assert body["object"] == "engagement"
    assert body["title"] == "Support bot"
    assert body["status"] == "lead"
    assert body["owner"] == {"name": "Olga"}
    (milestone,) = body["milestones"]
    assert {k: milestone[k] for k in ("title", "due_date", "amount", "status")} == {
        "title": "Prototype",
        "due_date": "2027-01-15",
        "amount": {"value": "1500.00", "currency": "usd"},
        "status": "pending",
    }
    assert [e["message"] for e in body["events"]] == ["Kick-off call booked.", "Engagement opened."]
    assert body["delivered_models"] == []


def test_internal_notes_budgets_and_staff_identities_never_show(
    alice: Person, engagement: object
) -> None:
    listed = alice.client.get("/v1/engagements").content.decode()
    detail = alice.client.get(f"/v1/engagements/{engagement.pk}").content.decode()  # type: ignore[attr-defined]

    for text in (listed, detail):
        assert "margin is thin" not in text
        assert "internal" not in text
        assert "budget" not in text
        assert "987.65" not in text
        assert "olga@atelier.test" not in text
        assert engagement.owner_id not in text  # type: ignore[attr-defined]


def test_without_a_display_name_the_owner_shows_by_name_never_by_email(alice: Person) -> None:
    engagement_for(alice, owner=staff_member("sam@atelier.test"))
    (listed,) = alice.client.get("/v1/engagements").json()["data"]
    assert listed["owner"] == {"name": "Olga Ops"}


def test_only_delivered_models_are_listed(alice: Person, engagement: object) -> None:
    hidden = customer_model(alice, suffix="hidden")
    shown = customer_model(alice, suffix="shown")
    CustomerModel.objects.for_organization(alice.organization).filter(
        pk__in=[hidden.pk, shown.pk]
    ).update(engagement_id=engagement.pk)  # type: ignore[attr-defined]
    CustomerModel.objects.for_organization(alice.organization).filter(pk=shown.pk).update(
        delivered_at="2026-11-01T00:00:00Z"
    )

    body = alice.client.get(f"/v1/engagements/{engagement.pk}").json()  # type: ignore[attr-defined]
    assert [m["id"] for m in body["delivered_models"]] == [shown.pk]


def test_the_list_is_the_organizations_own_newest_first_and_paginated(
    alice: Person, bob: Person, charlie: Person
) -> None:
    mine = [engagement_for(alice, title=f"Project {i}") for i in range(3)]
    engagement_for(charlie, title="Globex secret")

    first = bob.client.get("/v1/engagements?limit=2").json()  # a teammate reads them too
    assert [e["id"] for e in first["data"]] == [mine[2].pk, mine[1].pk]
    assert first["has_more"] is True
    rest = bob.client.get(f"/v1/engagements?limit=2&after={first['last_id']}").json()
    assert [e["id"] for e in rest["data"]] == [mine[0].pk]
    assert rest["has_more"] is False
    assert "Globex" not in json.dumps(first) + json.dumps(rest)


def _list_queries(person: Person) -> int:
    with CaptureQueriesContext(connection) as queries:
        assert person.client.get("/v1/engagements").status_code == 200
    return len(queries)


def test_the_list_reads_a_page_in_a_fixed_number_of_queries(alice: Person) -> None:
    def add(n: int) -> None:
        for i in range(n):
            engagement = engagement_for(alice, title=f"P{i}")
            services.milestone_add(
                engagement=engagement, title="M", amount=Decimal(1), actor=SYSTEM
            )
            services.engagement_event_add(engagement=engagement, message="hello")

    add(1)
    _list_queries(alice)  # the key's caches warm up on the first request
    one = _list_queries(alice)
    add(5)
    assert _list_queries(alice) == one


def test_another_organizations_engagement_is_a_404(
    alice: Person, charlie: Person, engagement: object
) -> None:
    response = charlie.client.get(f"/v1/engagements/{engagement.pk}")  # type: ignore[attr-defined]
    assert response.status_code == 404
    assert response.json()["error"]["type"] == "invalid_request_error"
    assert charlie.client.get("/v1/engagements").json()["data"] == []


@pytest.mark.parametrize("bad", ["nope", "eng_" + "x" * 500, "%00", "eng_01'; DROP TABLE"])
def test_a_malformed_id_is_a_404(alice: Person, bad: str) -> None:
    response = alice.client.get(f"/v1/engagements/{bad}")
    assert response.status_code == 404
    assert response.json()["error"]["param"] == "id"


def test_without_a_key_it_is_a_401(db: None) -> None:
    for url in ("/v1/engagements", "/v1/engagements/eng_x"):
        response = client_with(None).get(url)
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "missing_api_key"
    assert client_with("atl_live_bogus").get("/v1/engagements").status_code == 401


def test_nothing_here_writes(alice: Person, engagement: object) -> None:
    response = alice.client.post(f"/v1/engagements/{engagement.pk}", {}, format="json")  # type: ignore[attr-defined]
    assert response.status_code == 405


def test_the_endpoints_are_in_the_openapi_schema(db: None) -> None:
    schema = client_with(None).get("/v1/schema", HTTP_ACCEPT="application/vnd.oai.openapi+json")
    paths = json.loads(schema.content)["paths"]
    assert paths["/v1/engagements"]["get"]["operationId"] == "list_engagements"
    assert paths["/v1/engagements/{engagement_id}"]["get"]["operationId"] == "retrieve_engagement"
