"""/v1/organization/credits: buy prepaid credit through Stripe (localstripe), balance, grants."""

from __future__ import annotations

import time
from decimal import Decimal
from typing import Any

import pytest

from controlplane.billing.credits import credit_balance, credit_grant
from controlplane.billing.models import CreditGrant
from tests.support.localstripe import LocalStripe
from tests.support.people import Person, client_with, join

from . import events

pytestmark = pytest.mark.django_db

URL = "/v1/organization/credits"


@pytest.fixture
def stripe(stripe_settings: LocalStripe) -> LocalStripe:
    return stripe_settings


def buy(person: Person, amount: Any, **headers: str) -> Any:
    return person.client.post(URL, {"amount": amount}, format="json", **headers)


def test_a_purchase_is_a_payment_intent_granted_once_when_stripe_reports_it_paid(
    alice: Person, stripe: LocalStripe
) -> None:
    response = buy(alice, "25.00")
    assert response.status_code == 200, response.content
    body = response.json()
    assert (body["object"], body["amount"], body["currency"]) == (
        "organization.credit_purchase",
        "25.00",
        "usd",
    )
    assert body["client_secret"]
    intent = stripe.get(f"/v1/payment_intents/{body['payment_intent']}")
    assert intent["amount"] == 2500
    assert intent["metadata"]["organization_id"] == alice.organization.pk
    assert intent["metadata"]["atelier_purpose"] == "credits"
    # Nothing is granted before Stripe says the payment succeeded.
    assert credit_balance(alice.organization) == Decimal(0)

    # What Stripe.js does with the client secret, then Stripe's signed event (twice).
    card = stripe.card(intent["customer"])
    stripe.post(f"/v1/payment_intents/{intent['id']}", payment_method=card)
    paid = stripe.post(f"/v1/payment_intents/{intent['id']}/confirm")
    assert paid["status"] == "succeeded"
    assert events.deliver(events.event("payment_intent.succeeded", paid)).status_code == 200
    assert events.deliver(events.event("payment_intent.succeeded", paid)).status_code == 200

    listing = alice.client.get(URL).json()
    assert (listing["object"], listing["balance"], listing["currency"]) == ("list", "25.00", "usd")
    assert [(g["object"], g["amount"], g["source"]) for g in listing["data"]] == [
        ("organization.credit_grant", "25.00", "purchase")
    ]


def test_a_billing_member_buys_and_reads_credits(alice: Person, stripe: LocalStripe) -> None:
    member = join(alice.organization, "bill@acme.test", "billing")
    assert buy(member, 10).status_code == 200
    assert member.client.get(URL).status_code == 200


@pytest.mark.parametrize("role", ["developer", "viewer"])
def test_other_roles_may_not_buy_or_read_credits(
    alice: Person, stripe: LocalStripe, role: str
) -> None:
    member = join(alice.organization, f"{role}@acme.test", role)
    for response in (member.client.get(URL), buy(member, "25.00")):
        assert response.status_code == 403
        assert response.json()["error"]["code"] == "missing_scope"


def test_unauthenticated_requests_get_401(db: None) -> None:
    assert client_with(None).get(URL).status_code == 401
    response = client_with("sk-not-a-key").post(URL, {"amount": "25.00"}, format="json")
    assert response.status_code == 401


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({}, "amount"),
        ({"amount": "-5.00"}, "amount"),
        ({"amount": "0"}, "amount"),
        ({"amount": "4.99"}, "amount"),
        ({"amount": "10000.01"}, "amount"),
        ({"amount": "12.345"}, "amount"),
        ({"amount": "1" * 40}, "amount"),
        ({"amount": "lots"}, "amount"),
        ({"amount": "NaN"}, "amount"),
        ({"amount": True}, "amount"),
        ({"amount": "25.00", "organization": "org_x"}, "organization"),
    ],
    ids=[
        "missing",
        "negative",
        "zero",
        "below-min",
        "above-max",
        "three-decimals",
        "oversized",
        "not-a-number",
        "nan",
        "boolean",
        "unknown-field",
    ],
)
def test_bad_amounts_name_the_param_and_start_nothing(
    alice: Person, stripe: LocalStripe, body: dict[str, Any], param: str
) -> None:
    response = alice.client.post(URL, body, format="json")
    assert response.status_code == 400, response.content
    error = response.json()["error"]
    assert error["param"] == param
    assert error["message"]
    intents = stripe.get("/v1/payment_intents", limit=100)["data"]
    assert not [i for i in intents if i["metadata"].get("organization_id") == alice.organization.pk]


def test_a_body_that_is_not_an_object_is_refused(alice: Person, stripe: LocalStripe) -> None:
    assert alice.client.post(URL, ["25.00"], format="json").status_code == 400


def test_an_oversized_idempotency_key_is_refused(alice: Person, stripe: LocalStripe) -> None:
    response = buy(alice, "25.00", HTTP_IDEMPOTENCY_KEY="k" * 201)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "Idempotency-Key"


def test_without_stripe_configured_a_purchase_answers_503(alice: Person, settings: Any) -> None:
    settings.STRIPE_API_KEY = ""
    response = buy(alice, "25.00")
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "billing_disabled"
    # Staff grants still show without Stripe.
    credit_grant(
        organization=alice.organization, amount=Decimal("2.00"), source="staff", idempotency_key="s"
    )
    assert alice.client.get(URL).json()["balance"] == "2.00"


def test_each_organization_sees_only_its_own_credits(alice: Person, charlie: Person) -> None:
    credit_grant(
        organization=alice.organization, amount=Decimal("7.00"), source="staff", idempotency_key="a"
    )
    listing = charlie.client.get(URL).json()
    assert (listing["balance"], listing["data"]) == ("0.00", [])
    assert CreditGrant.objects.for_organization(alice.organization).count() == 1


def test_grants_are_paginated_newest_first(alice: Person) -> None:
    for n in range(3):
        time.sleep(0.002)  # ids order by their millisecond: one grant per millisecond
        credit_grant(
            organization=alice.organization,
            amount=Decimal(n + 1),
            source="staff",
            idempotency_key=f"p{n}",
        )
    first = alice.client.get(URL, {"limit": 2}).json()
    assert [g["amount"] for g in first["data"]] == ["3.00", "2.00"]
    assert first["has_more"] is True
    rest = alice.client.get(URL, {"limit": 2, "after": first["last_id"]}).json()
    assert [g["amount"] for g in rest["data"]] == ["1.00"]
    assert first["balance"] == rest["balance"] == "6.00"
    assert alice.client.get(URL, {"limit": "many"}).status_code == 400
