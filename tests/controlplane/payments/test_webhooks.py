"""POST /v1/stripe/webhook: signatures on the raw body, exactly-once, out-of-order safety.

Subscription events are applied by reading the subscription back from Stripe, so
those tests make their subscriptions in localstripe (through the gateway, which
stores nothing here) and deliver signed events about them.
"""

from __future__ import annotations

import time
import uuid
from decimal import Decimal
from typing import Any

import pytest
from django.db import OperationalError
from rest_framework.test import APIClient

from controlplane.billing.models import CreditGrant, Plan
from controlplane.payments import gateway, webhooks
from controlplane.payments.models import Dunning, StripeCustomer, StripeEvent, Subscription
from controlplane.tenancy.models import Organization
from tests.support.localstripe import API_KEY, WEBHOOK_SECRET, LocalStripe
from tests.support.people import Person
from tests.support.processes import free_port

from . import events
from .events import body_of, deliver, post, sign

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def _stripe_on(settings: Any) -> None:
    settings.STRIPE_API_KEY = API_KEY
    settings.STRIPE_WEBHOOK_SECRET = WEBHOOK_SECRET


@pytest.fixture
def customer(alice: Person) -> str:
    StripeCustomer.objects.create(organization=alice.organization, stripe_id="cus_alice")
    return "cus_alice"


@pytest.fixture
def stripe_customer(alice: Person, stripe_settings: LocalStripe) -> str:
    """Alice's customer in localstripe, with a card that pays."""
    customer = gateway.customer_for(alice.organization)
    stripe_settings.card(customer)
    return customer


def stripe_subscription(person: Person, customer: str, plan: str = "pro") -> dict[str, Any]:
    """A subscription started in Stripe only: nothing is stored here until an event says so."""
    return gateway.subscription_create(
        customer=customer,
        plan_id=gateway.plan_sync(Plan.objects.get(code=plan)),
        organization_id=person.organization.pk,
        plan_code=plan,
        key=f"test-{uuid.uuid4().hex}",
    )


def change_plan(sub: dict[str, Any], plan: str) -> dict[str, Any]:
    """Move the subscription to `plan` in Stripe; Stripe's new state of it."""
    return gateway.subscription_update_plan(
        subscription_id=sub["id"],
        item_id=sub["items"]["data"][0]["id"],
        plan_id=gateway.plan_sync(Plan.objects.get(code=plan)),
        plan_code=plan,
        key=f"test-{uuid.uuid4().hex}",
    )


def plan_of(person: Person) -> str:
    return Organization.objects.get(pk=person.organization.pk).plan


def subscription_of(person: Person) -> Subscription:
    return Subscription.objects.for_organization(person.organization).get()


def test_subscription_created_moves_the_organization_to_the_plan(
    alice: Person, stripe_customer: str
) -> None:
    sub = stripe_subscription(alice, stripe_customer)
    response = deliver(events.event("customer.subscription.created", sub))
    assert response.status_code == 200, response.content
    assert response.json()["outcome"] == "applied"
    assert plan_of(alice) == "pro"
    row = subscription_of(alice)
    assert (row.status, row.plan, row.stripe_subscription_id) == ("active", "pro", sub["id"])


def test_tampered_body_is_refused_and_changes_nothing(alice: Person, customer: str) -> None:
    body = body_of(
        events.event("customer.subscription.created", events.subscription("sub_1", customer))
    )
    signature = sign(body)
    tampered = body.replace(b'"pro"', b'"enterprise"')
    response = post(tampered, signature)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "invalid_webhook"
    assert "signature" in error["message"]
    assert plan_of(alice) == "free"
    assert not StripeEvent.objects.exists()


def test_wrong_secret_is_refused(alice: Person, customer: str) -> None:
    evt = events.event("customer.subscription.created", events.subscription("sub_1", customer))
    response = deliver(evt, secret="whsec_someone_else")
    assert response.status_code == 400
    assert plan_of(alice) == "free"


def test_stale_timestamp_is_refused_even_with_a_valid_signature(
    alice: Person, customer: str
) -> None:
    evt = events.event("customer.subscription.created", events.subscription("sub_1", customer))
    response = deliver(evt, t=int(time.time()) - 301)
    assert response.status_code == 400
    assert "tolerance" in response.json()["error"]["message"]
    assert plan_of(alice) == "free"


def test_missing_signature_header_is_refused(alice: Person, customer: str) -> None:
    body = body_of(
        events.event("customer.subscription.created", events.subscription("sub_1", customer))
    )
    response = post(body, None)
    assert response.status_code == 400
    assert "Stripe-Signature" in response.json()["error"]["message"]
    assert not StripeEvent.objects.exists()


@pytest.mark.parametrize(
    "body",
    [b"not json", b"[1, 2]", b'{"id": "evt_1", "type": "x"}', b'{"object": "charge"}'],
    ids=["not-json", "array", "no-data", "not-an-event"],
)
def test_signed_but_malformed_bodies_are_refused(body: bytes) -> None:
    response = post(body, sign(body))
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_oversized_body_is_refused_before_reading(settings: Any) -> None:
    settings.STRIPE_WEBHOOK_MAX_BYTES = 1000
    body = b'{"pad": "' + b"x" * 2000 + b'"}'
    response = post(body, sign(body))
    assert response.status_code == 413
    assert "1000" in response.json()["error"]["message"]


def test_get_is_not_allowed() -> None:
    from rest_framework.test import APIClient

    assert APIClient().get(events.URL).status_code == 405


def test_without_stripe_configured_the_webhook_refuses_with_503(settings: Any) -> None:
    settings.STRIPE_API_KEY = ""
    evt = events.event("customer.subscription.created", events.subscription("sub_1", "cus_x"))
    response = deliver(evt)
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "billing_disabled"


def test_replayed_event_is_acknowledged_and_has_no_second_effect(
    alice: Person, stripe_customer: str
) -> None:
    sub = stripe_subscription(alice, stripe_customer)
    evt = events.event("customer.subscription.created", sub)
    assert deliver(evt).json()["applied"] is True
    # Someone changes the plan meanwhile; a replay of the old event must not undo it.
    later = events.event(
        "customer.subscription.updated",
        change_plan(sub, "enterprise"),
        created=evt["created"] + 5,
    )
    assert deliver(later).status_code == 200
    replay = deliver(evt)
    assert replay.status_code == 200
    assert replay.json() == {"received": True, "outcome": "duplicate", "applied": False}
    assert plan_of(alice) == "enterprise"
    assert StripeEvent.objects.count() == 2


def test_out_of_order_subscription_updates_keep_the_newest_state(
    alice: Person, stripe_customer: str
) -> None:
    t = int(time.time())
    sub = stripe_subscription(alice, stripe_customer)
    created_pro = events.event("customer.subscription.created", sub, created=t)
    to_enterprise = events.event(
        "customer.subscription.updated", change_plan(sub, "enterprise"), created=t + 10
    )
    assert deliver(to_enterprise).json()["outcome"] == "applied"
    late = deliver(created_pro)
    assert late.status_code == 200
    assert late.json()["outcome"] == "unchanged"
    assert plan_of(alice) == "enterprise"
    assert subscription_of(alice).plan == "enterprise"
    assert StripeEvent.objects.get(pk=created_pro["id"]).outcome == "unchanged"


def test_same_second_events_delivered_in_reverse_order_leave_the_newest_state(
    alice: Person, stripe_customer: str
) -> None:
    # Stripe stamps events to the second: these two cannot be ordered by `created`.
    t = int(time.time())
    sub = stripe_subscription(alice, stripe_customer)
    created_pro = events.event("customer.subscription.created", sub, created=t)
    to_enterprise = events.event(
        "customer.subscription.updated", change_plan(sub, "enterprise"), created=t
    )
    assert deliver(to_enterprise).json()["outcome"] == "applied"
    late = deliver(created_pro)
    assert late.status_code == 200
    assert late.json()["applied"] is True
    row = subscription_of(alice)
    assert (row.plan, row.status) == ("enterprise", "active")
    assert plan_of(alice) == "enterprise"


def test_same_second_cancellation_and_its_withdrawal_in_reverse_order_keep_the_withdrawal(
    alice: Person, stripe_customer: str
) -> None:
    t = int(time.time())
    sub = stripe_subscription(alice, stripe_customer)
    deliver(events.event("customer.subscription.created", sub, created=t))
    scheduled = gateway.subscription_cancel_at_period_end(sub["id"], cancel=True)
    withdrawn = gateway.subscription_cancel_at_period_end(sub["id"], cancel=False)
    deliver(events.event("customer.subscription.updated", withdrawn, created=t + 1))
    deliver(events.event("customer.subscription.updated", scheduled, created=t + 1))
    assert subscription_of(alice).cancel_at_period_end is False


def test_a_late_update_cannot_revive_a_deleted_subscription(
    alice: Person, stripe_customer: str
) -> None:
    t = int(time.time())
    sub = stripe_subscription(alice, stripe_customer)
    deliver(events.event("customer.subscription.created", sub, created=t))
    canceled = gateway.subscription_cancel_now(sub["id"])
    deliver(events.event("customer.subscription.deleted", canceled, created=t + 20))
    # An update from before the deletion, and one stamped the same second, arrive late.
    for created in (t + 10, t + 20):
        evt = events.event("customer.subscription.updated", sub, created=created)
        assert deliver(evt).json()["outcome"] == "unchanged"
    assert subscription_of(alice).status == "canceled"
    assert plan_of(alice) == "free"


def test_deletion_of_a_replaced_subscription_is_ignored(
    alice: Person, stripe_customer: str
) -> None:
    t = int(time.time())
    old = stripe_subscription(alice, stripe_customer)
    deliver(events.event("customer.subscription.created", old, created=t))
    old_canceled = gateway.subscription_cancel_now(old["id"])
    deliver(events.event("customer.subscription.deleted", old_canceled, created=t + 1))
    new = stripe_subscription(alice, stripe_customer, "enterprise")
    deliver(events.event("customer.subscription.created", new, created=t + 2))
    # Stripe retries the old deletion later: the new subscription stays.
    retry = events.event("customer.subscription.deleted", old_canceled, created=t + 3)
    assert deliver(retry).json()["outcome"] == "other_subscription"
    row = subscription_of(alice)
    assert (row.stripe_subscription_id, row.status, row.plan) == (new["id"], "active", "enterprise")
    assert plan_of(alice) == "enterprise"


def test_an_event_that_fails_validation_is_recorded_failed_answered_200_and_not_rerun(
    alice: Person, stripe_customer: str, stripe_settings: LocalStripe
) -> None:
    # A subscription to a plan Stripe has and Atelier does not: applying it raises ApiError.
    plan_id = f"plan-unknown-{uuid.uuid4().hex[:8]}"
    stripe_settings.post(
        "/v1/plans",
        id=plan_id,
        amount="100",
        currency="usd",
        interval="month",
        **{"product[name]": "not an Atelier plan"},
    )
    sub = gateway.subscription_create(
        customer=stripe_customer,
        plan_id=plan_id,
        organization_id=alice.organization.pk,
        plan_code="platinum",
        key=f"test-{uuid.uuid4().hex}",
    )
    evt = events.event("customer.subscription.created", sub)
    response = deliver(evt)
    assert response.status_code == 200, response.content
    assert response.json() == {"received": True, "outcome": "failed", "applied": False}
    record = StripeEvent.objects.get(pk=evt["id"])
    assert record.outcome == "failed"
    assert record.failure.startswith("ApiError: ")
    assert "platinum" in record.failure
    # Nothing of it was applied, and delivering it again does not run it again.
    assert not Subscription.objects.for_organization(alice.organization).exists()
    assert plan_of(alice) == "free"
    again = deliver(evt)
    assert again.status_code == 200
    assert again.json() == {"received": True, "outcome": "duplicate", "applied": False}
    assert StripeEvent.objects.get(pk=evt["id"]).outcome == "failed"


def test_stripe_unreachable_while_applying_answers_503_so_stripe_retries(
    alice: Person, stripe_customer: str, settings: Any
) -> None:
    sub = stripe_subscription(alice, stripe_customer)
    evt = events.event("customer.subscription.created", sub)
    reachable = settings.STRIPE_API_BASE
    settings.STRIPE_API_BASE = f"http://127.0.0.1:{free_port()}"  # nothing listens
    settings.STRIPE_MAX_NETWORK_RETRIES = 0
    response = deliver(evt)
    assert response.status_code == 503, response.content
    assert response.json()["error"]["code"] == "payment_provider_error"
    assert not StripeEvent.objects.filter(pk=evt["id"]).exists()
    # Stripe's retry, once Stripe answers again, applies it.
    settings.STRIPE_API_BASE = reachable
    assert deliver(evt).json()["outcome"] == "applied"
    assert plan_of(alice) == "pro"


def test_a_database_failure_in_a_handler_is_a_500_and_the_retry_applies_it(
    alice: Person, customer: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def database_down(*args: Any) -> str:
        raise OperationalError("the database went away")

    evt = events.event("invoice.payment_failed", events.invoice("in_db", customer))
    body = body_of(evt)
    monkeypatch.setitem(webhooks.HANDLERS, "invoice.payment_failed", database_down)
    response = APIClient(raise_request_exception=False).post(
        events.URL, data=body, content_type="application/json", HTTP_STRIPE_SIGNATURE=sign(body)
    )
    assert response.status_code == 500
    assert not StripeEvent.objects.filter(pk=evt["id"]).exists()
    monkeypatch.undo()
    assert deliver(evt).json()["outcome"] == "dunning_started"


def test_events_of_unknown_customers_are_recorded_and_ignored(alice: Person) -> None:
    evt = events.event("customer.subscription.created", events.subscription("sub_1", "cus_nobody"))
    response = deliver(evt)
    assert response.status_code == 200
    assert response.json()["outcome"] == "ignored_unknown_customer"
    assert plan_of(alice) == "free"


def test_unhandled_event_types_are_recorded_once(customer: str) -> None:
    evt = events.event("customer.created", {"id": customer, "object": "customer"})
    assert deliver(evt).json() == {"received": True, "outcome": "ignored_type", "applied": True}
    assert deliver(evt).json()["outcome"] == "duplicate"


def test_payment_failure_starts_dunning_and_payment_ends_it(alice: Person, customer: str) -> None:
    t = int(time.time())
    failed = events.event("invoice.payment_failed", events.invoice("in_1", customer), created=t)
    assert deliver(failed).json()["outcome"] == "dunning_started"
    dunning = Dunning.objects.for_organization(alice.organization).get()
    assert dunning.resolved_at is None
    assert (dunning.grace_ends_at - dunning.started_at).days == 7
    # Stripe's retry fails again: the grace period does not restart.
    again = events.event(
        "invoice.payment_failed", events.invoice("in_1", customer), created=t + 86400
    )
    assert deliver(again).json()["outcome"] == "already_open"
    paid = events.event("invoice.paid", events.invoice("in_1", customer), created=t + 90000)
    assert deliver(paid).json()["outcome"] == "service_restored"
    dunning.refresh_from_db()
    assert dunning.resolved_at is not None


def test_a_failure_delivered_after_the_payment_starts_no_dunning(
    alice: Person, customer: str
) -> None:
    t = int(time.time())
    deliver(events.event("invoice.paid", events.invoice("in_1", customer), created=t + 5))
    late = events.event("invoice.payment_failed", events.invoice("in_1", customer), created=t)
    assert deliver(late).json()["outcome"] == "paid"
    assert (
        not Dunning.objects.for_organization(alice.organization)
        .filter(resolved_at__isnull=True)
        .exists()
    )


def _credit_intent(pi_id: str, customer: str, amount: str = "25.00") -> dict[str, Any]:
    return {
        "id": pi_id,
        "object": "payment_intent",
        "customer": customer,
        "amount": int(Decimal(amount) * 100),
        "metadata": {"atelier_purpose": "credits", "credit_amount": amount},
    }


def test_a_credit_purchase_is_granted_once(alice: Person, customer: str) -> None:
    intent = _credit_intent("pi_1", customer)
    evt = events.event("payment_intent.succeeded", intent)
    assert deliver(evt).json()["outcome"] == "credits_granted"
    assert deliver(evt).json()["outcome"] == "duplicate"
    # The same purchase seen again through its Checkout Session (another event id).
    session = {
        "id": "cs_1",
        "object": "checkout.session",
        "customer": customer,
        "payment_status": "paid",
        "payment_intent": "pi_1",
        "metadata": intent["metadata"],
    }
    assert deliver(events.event("checkout.session.completed", session)).status_code == 200
    grants = CreditGrant.objects.for_organization(alice.organization)
    assert [g.amount for g in grants] == [Decimal("25.00")]


def test_payment_intents_that_are_not_credit_purchases_grant_nothing(
    alice: Person, customer: str
) -> None:
    intent = {"id": "pi_2", "object": "payment_intent", "customer": customer, "metadata": {}}
    response = deliver(events.event("payment_intent.succeeded", intent))
    assert response.json()["outcome"] == "ignored_not_credits"
    assert not CreditGrant.objects.for_organization(alice.organization).exists()


def test_an_outsiders_customer_id_only_touches_the_outsider(
    alice: Person, charlie: Person, stripe_customer: str, stripe_settings: LocalStripe
) -> None:
    outsider = gateway.customer_for(charlie.organization)
    stripe_settings.card(outsider)
    deliver(events.event("customer.subscription.created", stripe_subscription(charlie, outsider)))
    assert plan_of(charlie) == "pro"
    assert plan_of(alice) == "free"


def _webhook_count(kind: str, outcome: str) -> float:
    from controlplane.core import metrics

    return metrics.WEBHOOK_EVENTS.labels(type=kind, outcome=outcome)._value.get()


def test_events_are_counted_by_type_and_outcome(alice: Person, customer: str) -> None:
    before = {
        key: _webhook_count(*key)
        for key in (
            ("other", "ignored_type"),
            ("other", "duplicate"),
            ("customer.subscription.created", "ignored_unknown_customer"),
            ("invoice.payment_failed", "processed"),
        )
    }
    unhandled = events.event("customer.created", {"id": customer, "object": "customer"})
    deliver(unhandled)
    deliver(unhandled)
    deliver(events.event("customer.subscription.created", events.subscription("s", "cus_x")))
    invoice = events.invoice(f"in_{uuid.uuid4().hex[:8]}", customer)
    assert deliver(events.event("invoice.payment_failed", invoice)).json()["applied"] is True
    after = {key: _webhook_count(*key) for key in before}
    assert {key: after[key] - before[key] for key in before} == dict.fromkeys(before, 1.0)
