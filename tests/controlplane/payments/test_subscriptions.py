"""/v1/organization/subscription against localstripe (the real SDK on loopback)."""

from __future__ import annotations

from typing import Any

import pytest

from controlplane.billing.models import Plan, PlanAssignment
from controlplane.payments.models import StripeCustomer
from controlplane.tenancy.models import Organization
from tests.support.localstripe import LocalStripe
from tests.support.people import Person, client_with, join

pytestmark = pytest.mark.django_db

URL = "/v1/organization/subscription"
CANCEL = "/v1/organization/subscription/cancel"


@pytest.fixture
def stripe(stripe_settings: LocalStripe) -> LocalStripe:
    return stripe_settings


def new_card(stripe: LocalStripe, number: str = "4242424242424242") -> str:
    pm = stripe.post(
        "/v1/payment_methods",
        **{
            "type": "card",
            "card[number]": number,
            "card[exp_month]": "12",
            "card[exp_year]": "2040",
            "card[cvc]": "123",
        },
    )
    return str(pm["id"])


def subscribe(person: Person, stripe: LocalStripe, plan: str = "pro") -> Any:
    return person.client.post(
        URL, {"plan": plan, "payment_method": new_card(stripe)}, format="json"
    )


def org_plan(person: Person) -> str:
    return Organization.objects.get(pk=person.organization.pk).plan


def customer_of(person: Person) -> str:
    return StripeCustomer.objects.for_organization(person.organization).get().stripe_id


def test_owner_starts_a_subscription(alice: Person, stripe: LocalStripe) -> None:
    response = subscribe(alice, stripe)
    assert response.status_code == 200, response.content
    body = response.json()
    assert body["plan"] == "pro"
    assert body["status"] == "active"
    assert body["organization_plan"] == "pro"
    assert body["current_period_end"] > 0
    assert org_plan(alice) == "pro"
    assert PlanAssignment.objects.for_organization(alice.organization).filter(plan="pro").exists()
    # In Stripe: one customer for the org, subscribed to the plan mirrored from the Plan row.
    subs = stripe.get("/v1/subscriptions", customer=customer_of(alice))["data"]
    plan = Plan.objects.get(code="pro")
    assert [s["plan"]["id"] for s in subs] == [plan.stripe_price_id]
    assert plan.stripe_price_id == "atelier-pro-2900-usd-month"
    assert stripe.get(f"/v1/plans/{plan.stripe_price_id}")["amount"] == 2900
    assert alice.client.get(URL).json()["status"] == "active"


def test_a_billing_member_manages_the_subscription(alice: Person, stripe: LocalStripe) -> None:
    billing = join(alice.organization, "bill@acme.test", "billing")
    assert subscribe(billing, stripe).status_code == 200
    assert billing.client.post(CANCEL, {}, format="json").status_code == 200


@pytest.mark.parametrize("role", ["developer", "viewer"])
def test_developers_and_viewers_may_not_touch_billing(
    alice: Person, stripe: LocalStripe, role: str
) -> None:
    member = join(alice.organization, f"{role}@acme.test", role)
    for response in (
        member.client.get(URL),
        member.client.post(URL, {"plan": "pro"}, format="json"),
        member.client.post(CANCEL, {}, format="json"),
    ):
        assert response.status_code == 403
        assert response.json()["error"]["code"] == "missing_scope"
    assert org_plan(alice) == "free"


def test_unauthenticated_requests_get_401(db: None) -> None:
    for response in (
        client_with(None).get(URL),
        client_with(None).post(URL, {"plan": "pro"}, format="json"),
        client_with("sk-not-a-key").post(CANCEL, {}, format="json"),
    ):
        assert response.status_code == 401


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"plan": "platinum"}, "plan"),
        ({"plan": "free"}, "plan"),
        ({}, "plan"),
        ({"plan": "p" * 33}, "plan"),
        ({"plan": 7.5}, "plan"),
        ({"plan": "pro", "organization": "org_x"}, "organization"),
        ({"plan": "pro", "payment_method": "card_4242"}, "payment_method"),
    ],
    ids=["unknown", "free", "missing", "oversized", "not-a-string", "unknown-field", "bad-pm"],
)
def test_bad_requests_name_the_param(
    alice: Person, stripe: LocalStripe, body: dict[str, Any], param: str
) -> None:
    response = alice.client.post(URL, body, format="json")
    assert response.status_code == 400, response.content
    assert response.json()["error"]["param"] == param
    assert org_plan(alice) == "free"


def test_a_body_that_is_not_an_object_is_refused(alice: Person, stripe: LocalStripe) -> None:
    response = alice.client.post(URL, ["pro"], format="json")
    assert response.status_code == 400


def test_free_plan_error_says_how_to_go_back(alice: Person, stripe: LocalStripe) -> None:
    message = alice.client.post(URL, {"plan": "free"}, format="json").json()["error"]["message"]
    assert "cancel" in message


def test_plan_change_mid_period_prorates_and_moves_the_org(
    alice: Person, stripe: LocalStripe
) -> None:
    assert subscribe(alice, stripe).status_code == 200
    response = alice.client.post(URL, {"plan": "enterprise"}, format="json")
    assert response.status_code == 200, response.content
    assert response.json()["plan"] == "enterprise"
    assert org_plan(alice) == "enterprise"
    customer = customer_of(alice)
    (sub,) = stripe.get("/v1/subscriptions", customer=customer)["data"]
    assert sub["plan"]["id"] == "atelier-enterprise-50000-usd-month"
    # Stripe credits the unused time of the old plan as a pending invoice item.
    pending = stripe.get("/v1/invoiceitems", customer=customer)["data"]
    assert [(i["proration"], i["amount"]) for i in pending] == [(True, -2900)]
    history = PlanAssignment.objects.for_organization(alice.organization).order_by(
        "effective_from", "created_at"
    )
    assert [a.plan_id for a in history] == ["free", "pro", "enterprise"]


def test_subscribing_again_to_the_same_plan_is_a_conflict(
    alice: Person, stripe: LocalStripe
) -> None:
    subscribe(alice, stripe)
    response = alice.client.post(URL, {"plan": "pro"}, format="json")
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "already_subscribed"


def test_cancel_at_period_end_keeps_the_plan_until_then(alice: Person, stripe: LocalStripe) -> None:
    subscribe(alice, stripe)
    response = alice.client.post(CANCEL, {}, format="json")
    assert response.status_code == 200
    assert response.json()["cancel_at_period_end"] is True
    assert response.json()["status"] == "active"
    assert org_plan(alice) == "pro"
    (sub,) = stripe.get("/v1/subscriptions", customer=customer_of(alice))["data"]
    assert sub["cancel_at_period_end"] is True


def test_cancel_now_returns_the_org_to_free(alice: Person, stripe: LocalStripe) -> None:
    subscribe(alice, stripe)
    response = alice.client.post(CANCEL, {"at_period_end": False}, format="json")
    assert response.status_code == 200
    assert response.json()["status"] == "canceled"
    assert org_plan(alice) == "free"
    assert stripe.get("/v1/subscriptions", customer=customer_of(alice))["data"] == []
    # And a new subscription can start afterwards.
    assert subscribe(alice, stripe, "enterprise").status_code == 200
    assert org_plan(alice) == "enterprise"


def test_cancel_without_a_subscription_is_a_conflict(alice: Person, stripe: LocalStripe) -> None:
    response = alice.client.post(CANCEL, {}, format="json")
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "no_subscription"


def test_cancel_refuses_unknown_fields(alice: Person, stripe: LocalStripe) -> None:
    response = alice.client.post(CANCEL, {"now": True}, format="json")
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "now"


def test_a_declined_card_leaves_the_org_on_its_plan(alice: Person, stripe: LocalStripe) -> None:
    response = alice.client.post(
        URL,
        {"plan": "pro", "payment_method": new_card(stripe, "4000000000000341")},
        format="json",
    )
    assert response.status_code == 200, response.content
    assert response.json()["status"] == "incomplete"
    assert org_plan(alice) == "free"


def test_a_card_refused_at_attach_time_is_a_402(alice: Person, stripe: LocalStripe) -> None:
    response = alice.client.post(
        URL,
        {"plan": "pro", "payment_method": new_card(stripe, "4000000000000002")},
        format="json",
    )
    assert response.status_code == 402
    assert response.json()["error"]["type"] == "billing_error"
    assert "declined" in response.json()["error"]["message"]


def test_without_stripe_configured_subscriptions_answer_503(alice: Person, settings: Any) -> None:
    settings.STRIPE_API_KEY = ""
    response = alice.client.post(URL, {"plan": "pro"}, format="json")
    assert response.status_code == 503
    error = response.json()["error"]
    assert error["code"] == "billing_disabled"
    assert "STRIPE_API_KEY" in error["message"]
    assert alice.client.get(URL).json()["status"] == "none"


def test_each_organization_sees_only_its_own_subscription(
    alice: Person, charlie: Person, stripe: LocalStripe
) -> None:
    subscribe(alice, stripe)
    assert charlie.client.get(URL).json()["status"] == "none"
    assert charlie.client.post(CANCEL, {}, format="json").status_code == 409
    assert org_plan(alice) == "pro"
