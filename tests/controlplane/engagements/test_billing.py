"""Milestones are billed through Stripe (localstripe here), once: billing one twice creates
nothing new, neither here nor in Stripe."""

from __future__ import annotations

from datetime import date
from decimal import Decimal
from typing import Any

import pytest

from controlplane.audit.models import AuditLog
from controlplane.core.errors import ApiError, Conflict
from controlplane.engagements import services
from controlplane.engagements.models import Engagement, EngagementEvent, Milestone
from controlplane.payments import gateway
from tests.controlplane.payments.test_gateway import billable, item_amounts
from tests.support.engagements import actor_of
from tests.support.localstripe import LocalStripe
from tests.support.people import Person

pytestmark = pytest.mark.django_db


@pytest.fixture
def stripe(stripe_settings: LocalStripe) -> LocalStripe:
    stripe_settings.forget_webhooks()
    return stripe_settings


@pytest.fixture
def milestone(engagement: Engagement) -> Milestone:
    return services.milestone_add(
        engagement=engagement,
        title="Prototype accepted",
        amount=Decimal("1250.50"),
        due_date=date(2027, 1, 31),
        actor=actor_of(engagement.owner),
    )


def milestone_invoices(stripe: LocalStripe, customer: str, milestone: Milestone) -> list[Any]:
    listed = stripe.get("/v1/invoices", customer=customer)["data"]
    return [i for i in listed if i["metadata"].get("atelier_invoice_id") == milestone.billing_key]


def test_a_milestone_is_billed_once_on_one_stripe_invoice(
    alice: Person, engagement: Engagement, milestone: Milestone, stripe: LocalStripe
) -> None:
    customer = billable(stripe, alice)
    actor = actor_of(engagement.owner)

    billed = services.engagement_milestone_bill(milestone=milestone, actor=actor)

    assert billed.status == "billed"
    assert billed.billed_at is not None
    (invoice,) = milestone_invoices(stripe, customer, milestone)
    assert billed.stripe_invoice_id == invoice["id"]
    assert item_amounts(stripe, invoice["id"]) == [125050]
    assert billed.stripe_invoice_status == invoice["status"] == "paid"  # the card was charged
    listed_before = stripe.get("/v1/invoices", customer=customer)["data"]
    items_before = stripe.get("/v1/invoiceitems", customer=customer)["data"]

    with pytest.raises(Conflict) as again:
        services.engagement_milestone_bill(milestone=milestone, actor=actor)

    assert again.value.code == "milestone_already_billed"
    assert "nothing new was created" in str(again.value.detail)
    assert stripe.get("/v1/invoices", customer=customer)["data"] == listed_before
    assert stripe.get("/v1/invoiceitems", customer=customer)["data"] == items_before
    stored = Milestone.objects.for_organization(alice.organization).get()
    assert (stored.stripe_invoice_id, stored.billed_at) == (invoice["id"], billed.billed_at)
    assert (
        AuditLog.objects.for_organization(alice.organization)
        .filter(action="engagement.milestone_billed")
        .count()
        == 1
    )
    assert (
        EngagementEvent.objects.for_organization(alice.organization).filter(kind="billing").count()
        == 1
    )
    body = alice.client.get(f"/v1/engagements/{engagement.pk}").json()
    assert body["milestones"][0]["status"] == "billed"


def test_a_stale_copy_of_the_milestone_cannot_bill_it_again(
    alice: Person, engagement: Engagement, milestone: Milestone, stripe: LocalStripe
) -> None:
    customer = billable(stripe, alice)
    stale = Milestone.objects.for_organization(alice.organization).get(pk=milestone.pk)
    services.engagement_milestone_bill(milestone=milestone, actor=actor_of(engagement.owner))

    with pytest.raises(Conflict):
        services.engagement_milestone_bill(milestone=stale, actor=actor_of(engagement.owner))
    assert len(milestone_invoices(stripe, customer, milestone)) == 1


def test_a_half_done_bill_resumes_with_the_item_it_made(
    alice: Person, engagement: Engagement, milestone: Milestone, stripe: LocalStripe
) -> None:
    # A first attempt died after Stripe made the invoice item: the retry reuses it.
    customer = billable(stripe, alice)
    gateway.invoice_item_create(
        customer=customer,
        amount_cents=125050,
        currency="usd",
        description="left over",
        metadata={"atelier_invoice_line_id": milestone.billing_key},
    )

    billed = services.engagement_milestone_bill(
        milestone=milestone, actor=actor_of(engagement.owner)
    )

    assert item_amounts(stripe, billed.stripe_invoice_id) == [125050]


def test_other_pending_items_are_not_swept_into_a_milestone_invoice(
    alice: Person, engagement: Engagement, milestone: Milestone, stripe: LocalStripe
) -> None:
    customer = billable(stripe, alice)
    gateway.invoice_item_create(
        customer=customer,
        amount_cents=999,
        currency="usd",
        description="someone else's",
        metadata={"atelier_invoice_line_id": "il_other"},
    )
    with pytest.raises(Conflict, match="other invoice items waiting"):
        services.engagement_milestone_bill(milestone=milestone, actor=actor_of(engagement.owner))
    assert milestone_invoices(stripe, customer, milestone) == []
    assert Milestone.objects.for_organization(alice.organization).get().status == "pending"


def test_a_milestone_of_a_lead_or_of_nothing_is_not_billed(
    alice: Person, engagement: Engagement, milestone: Milestone, stripe: LocalStripe
) -> None:
    customer = billable(stripe, alice)
    free = services.milestone_add(
        engagement=engagement, title="Free", amount=Decimal(0), actor=actor_of(engagement.owner)
    )
    with pytest.raises(ApiError, match="no amount to bill"):
        services.engagement_milestone_bill(milestone=free, actor=actor_of(engagement.owner))
    Engagement.objects.for_organization(alice.organization).filter(pk=engagement.pk).update(
        status="proposal"
    )
    with pytest.raises(Conflict, match="once an engagement is active"):
        services.engagement_milestone_bill(milestone=milestone, actor=actor_of(engagement.owner))
    assert milestone_invoices(stripe, customer, milestone) == []
    assert stripe.get("/v1/invoiceitems", customer=customer)["data"] == []


def test_billing_needs_stripe(
    alice: Person, engagement: Engagement, milestone: Milestone, settings: Any
) -> None:
    settings.STRIPE_API_KEY = ""
    with pytest.raises(ApiError) as refused:
        services.engagement_milestone_bill(milestone=milestone, actor=actor_of(engagement.owner))
    assert refused.value.code == "billing_disabled"
    assert Milestone.objects.for_organization(alice.organization).get().status == "pending"


def test_a_milestone_follows_its_invoice_paid_later_through_the_webhook(
    alice: Person, engagement: Engagement, milestone: Milestone, stripe: LocalStripe
) -> None:
    """The card declines, so the milestone's invoice stays open; the customer pays it on
    Stripe's page later and the verified `invoice.paid` webhook marks the milestone paid,
    once (a redelivered event adds no second customer event)."""
    from tests.controlplane.payments import events

    customer = billable(stripe, alice, "4000000000000341")  # every charge declined
    billed = services.engagement_milestone_bill(
        milestone=milestone, actor=actor_of(engagement.owner)
    )
    assert billed.stripe_invoice_status == "open"
    paid = {
        "id": billed.stripe_invoice_id,
        "object": "invoice",
        "customer": customer,
        "status": "paid",
        "metadata": {"atelier_invoice_id": milestone.billing_key},
    }
    event = events.event("invoice.paid", paid)

    assert events.deliver(event).status_code == 200
    assert events.deliver(event).status_code == 200

    stored = Milestone.objects.for_organization(alice.organization).get(pk=milestone.pk)
    assert stored.stripe_invoice_status == "paid"
    said = EngagementEvent.objects.for_organization(alice.organization).filter(
        kind="billing", message__contains="was paid"
    )
    assert said.count() == 1
