"""End to end: localstripe signs and POSTs its own events to the running app (live_server)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest
from asgiref.sync import async_to_sync
from django.utils import timezone

from controlplane.billing.models import Invoice, InvoiceLine
from controlplane.billing.plans import plans_ensure_defaults
from controlplane.payments import access, gateway, services
from controlplane.payments.models import Dunning, StripeEvent
from controlplane.tenancy.models import Organization
from tests.support.localstripe import LocalStripe
from tests.support.people import Person

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def stripe(stripe_settings: LocalStripe, live_server: Any) -> Iterator[LocalStripe]:
    plans_ensure_defaults()  # an earlier transactional test's flush removed the seeded plans
    stripe_settings.register_webhook(f"{live_server.url}/v1/stripe/webhook")
    yield stripe_settings
    stripe_settings.forget_webhooks()


def wait_for(check: Callable[[], Any], what: str, timeout: float = 15.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def events_of(org: Organization, type_: str) -> list[StripeEvent]:
    return list(StripeEvent.objects.filter(organization=org, type=type_))


def test_subscription_events_from_stripe_are_verified_and_applied_once(
    alice: Person, stripe: LocalStripe
) -> None:
    customer = gateway.customer_for(alice.organization)
    stripe.card(customer)
    response = alice.client.post("/v1/organization/subscription", {"plan": "pro"}, format="json")
    assert response.status_code == 200, response.content
    created = wait_for(
        lambda: events_of(alice.organization, "customer.subscription.created"),
        "customer.subscription.created",
    )
    # Applied, or found Stripe's state already stored (by the API call's own sync).
    assert [e.outcome for e in created] in (["applied"], ["unchanged"])
    paid = wait_for(
        lambda: events_of(alice.organization, "invoice.payment_succeeded"),
        "invoice.payment_succeeded",
    )
    assert paid[0].outcome == "paid"
    assert Organization.objects.get(pk=alice.organization.pk).plan == "pro"

    response = alice.client.post(
        "/v1/organization/subscription/cancel", {"at_period_end": False}, format="json"
    )
    assert response.status_code == 200
    deleted = wait_for(
        lambda: events_of(alice.organization, "customer.subscription.deleted"),
        "customer.subscription.deleted",
    )
    assert deleted[0].outcome in ("applied", "unchanged")
    assert Organization.objects.get(pk=alice.organization.pk).plan == "free"


def test_a_failed_invoice_payment_starts_dunning_through_stripes_webhook(
    alice: Person, stripe: LocalStripe
) -> None:
    org = alice.organization
    customer = gateway.customer_for(org)
    stripe.allow_invoices(customer)  # before the failing debit: its $0 invoice is paid
    stripe.sepa_debit(customer)
    invoice = Invoice.objects.create(
        organization=org,
        period_start=timezone.now() - timedelta(days=30),
        period_end=timezone.now(),
        subtotal=Decimal("12.00"),
        total=Decimal("12.00"),
    )
    InvoiceLine.objects.create(
        organization=org, invoice=invoice, kind="usage", description="tokens", amount=Decimal(12)
    )
    stripe_id = services.invoice_push(organization=org, invoice=invoice)
    dunning = wait_for(
        lambda: Dunning.objects.for_organization(org).filter(stripe_invoice_id=stripe_id).first(),
        "dunning from invoice.payment_failed",
    )
    assert dunning.resolved_at is None
    assert dunning.amount_due == 1200
    access.standing_cache_clear()
    assert async_to_sync(access.ainference_refusal)(org.pk) is None  # within the grace period
    refusal = async_to_sync(access.ainference_refusal)(
        org.pk, now=timezone.now() + timedelta(days=8)
    )
    assert refusal is not None
    assert stripe_id in str(refusal.detail)
