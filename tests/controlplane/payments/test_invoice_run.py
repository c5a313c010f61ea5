"""The monthly invoice run against localstripe: who charges the plan fee, status races, reruns."""

from __future__ import annotations

from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

import pytest
from django.test import override_settings

from controlplane.billing.credits import credit_balance, credit_grant
from controlplane.billing.invoicing import invoice_push, invoice_run, invoice_status_advance
from controlplane.billing.models import (
    CreditGrant,
    Invoice,
    InvoiceLine,
    InvoiceStatus,
    Meter,
    PlanAssignment,
)
from controlplane.billing.plans import plan_change, plans_ensure_defaults
from controlplane.payments import gateway
from controlplane.payments.models import StripeCustomer, StripeInvoice
from controlplane.tenancy.models import Organization
from tests.controlplane.billing.factories import price, usage
from tests.support.localstripe import LocalStripe
from tests.support.people import Person
from tests.support.plans import set_plan

from .test_gateway import billable, item_amounts, stripe_invoices
from .test_subscriptions import subscribe

pytestmark = pytest.mark.django_db
JAN = date(2026, 1, 1)
SINCE = datetime(2024, 1, 1, tzinfo=UTC)


@pytest.fixture
def stripe(stripe_settings: LocalStripe) -> LocalStripe:
    stripe_settings.forget_webhooks()  # no other test's live server gets this test's events
    return stripe_settings


@pytest.fixture(autouse=True)
def _prices(db: None) -> None:
    plans_ensure_defaults()
    price(Meter.PROMPT_TOKENS, "1.00", SINCE)  # $1 per 1M prompt tokens
    set_plan("pro", monthly_price=Decimal("29.00"), included_amount=Decimal(0))


def created_long_ago(person: Person) -> None:
    Organization.objects.filter(pk=person.organization.pk).update(
        created_at=datetime(2025, 1, 1, tzinfo=UTC)
    )
    person.organization.refresh_from_db()


def the_invoice(person: Person) -> Invoice:
    return Invoice.objects.for_organization(person.organization).get()


# --- 1. the plan fee has one owner --------------------------------------------------------------


def test_a_subscribed_org_pays_the_plan_fee_once_through_its_subscription(
    alice: Person, stripe: LocalStripe
) -> None:
    created_long_ago(alice)
    assert subscribe(alice, stripe).status_code == 200
    assignments = PlanAssignment.objects.for_organization(alice.organization)
    (by_subscription,) = assignments.filter(plan="pro")
    assert by_subscription.billed_by == "subscription"
    # Pretend the subscription started before January, then January's usage is invoiced.
    assignments.filter(pk=by_subscription.pk).update(
        effective_from=datetime(2025, 12, 1, tzinfo=UTC)
    )
    usage(alice, datetime(2026, 1, 5, tzinfo=UTC), prompt=4_000_000)  # $4.00

    invoice_run(period=JAN)
    invoice = the_invoice(alice)
    assert sorted(invoice.lines.values_list("kind", "amount")) == [
        ("plan", Decimal("0.00")),
        ("usage", Decimal("4.00")),
    ]
    assert invoice.total == Decimal("4.00")
    # Stripe gets the usage only: the subscription's own invoices charge the $29.
    assert item_amounts(stripe, invoice.stripe_invoice_id) == [400]
    customer = StripeCustomer.objects.for_organization(alice.organization).get().stripe_id
    (sub,) = stripe.get("/v1/subscriptions", customer=customer)["data"]
    assert sub["plan"]["amount"] == 2900


def test_a_staff_assigned_plan_is_charged_on_the_monthly_invoice(
    alice: Person, stripe: LocalStripe
) -> None:
    created_long_ago(alice)
    plan_change(
        organization=alice.organization, plan_code="pro", at=datetime(2025, 12, 1, tzinfo=UTC)
    )
    usage(alice, datetime(2026, 1, 5, tzinfo=UTC), prompt=4_000_000)
    billable(stripe, alice)  # a card, and localstripe's $0 subscription (see README)

    invoice_run(period=JAN)
    invoice = the_invoice(alice)
    assert invoice.total == Decimal("33.00")
    assert item_amounts(stripe, invoice.stripe_invoice_id) == [400, 2900]


def test_subscribing_to_the_plan_staff_assigned_hands_the_fee_to_the_subscription(
    alice: Person, stripe: LocalStripe
) -> None:
    plan_change(organization=alice.organization, plan_code="pro")
    assert subscribe(alice, stripe).status_code == 200
    latest = (
        PlanAssignment.objects.for_organization(alice.organization)
        .order_by("effective_from", "created_at")
        .last()
    )
    assert latest is not None
    assert (latest.plan_id, latest.billed_by) == ("pro", "subscription")


# --- 2. invoice statuses only move forward ------------------------------------------------------


def test_an_invoice_paid_at_once_stays_paid_after_the_push(
    alice: Person, stripe: LocalStripe
) -> None:
    created_long_ago(alice)
    usage(alice, datetime(2026, 1, 5, tzinfo=UTC), prompt=4_000_000)
    billable(stripe, alice)
    invoice_run(period=JAN)
    invoice = the_invoice(alice)
    (remote,) = stripe_invoices(stripe, alice)
    assert remote["status"] == "paid"  # collected at once by `pay`
    # The billing wrapper used to overwrite this with `open` from its in-memory object.
    assert (invoice.status, invoice.stripe_invoice_id) == (InvoiceStatus.PAID, remote["id"])
    assert invoice.pushed_at is not None


def test_a_paid_from_the_webhook_is_not_undone_by_a_push_that_saw_it_open(
    alice: Person, stripe: LocalStripe
) -> None:
    from . import events

    created_long_ago(alice)
    usage(alice, datetime(2026, 1, 5, tzinfo=UTC), prompt=4_000_000)
    customer = billable(stripe, alice, "4000000000000341")  # every charge declined: stays open
    invoice = _stored_draft(alice)
    stale = Invoice.objects.for_organization(alice.organization).get(pk=invoice.pk)
    # The customer paid on the hosted page; Stripe's invoice.paid is applied before the
    # push (started earlier, holding `stale`) stores what it saw: `open`.
    paid = {
        "id": "in_paid_elsewhere",
        "object": "invoice",
        "customer": customer,
        "status": "paid",
        "metadata": {"atelier_invoice_id": invoice.pk},
    }
    assert events.deliver(events.event("invoice.paid", paid)).status_code == 200
    assert invoice_push(organization=alice.organization, invoice=stale)
    (remote,) = stripe_invoices(stripe, alice)
    assert remote["status"] == "open"
    assert stale.status == InvoiceStatus.PAID
    assert the_invoice(alice).status == InvoiceStatus.PAID


def test_status_advance_never_moves_back(alice: Person) -> None:
    created_long_ago(alice)
    usage(alice, datetime(2026, 1, 5, tzinfo=UTC), prompt=4_000_000)
    invoice = _stored_draft(alice)

    def advance(status: str) -> str:
        return invoice_status_advance(
            organization=alice.organization, invoice_id=invoice.pk, status=status
        )

    assert advance(InvoiceStatus.DRAFT) == InvoiceStatus.DRAFT
    assert advance(InvoiceStatus.OPEN) == InvoiceStatus.OPEN
    assert advance(InvoiceStatus.DRAFT) == InvoiceStatus.OPEN
    assert advance(InvoiceStatus.PAID) == InvoiceStatus.PAID
    assert advance(InvoiceStatus.OPEN) == InvoiceStatus.PAID
    assert advance(InvoiceStatus.VOID) == InvoiceStatus.PAID  # a paid invoice is not voided
    # Another organization's invoice is out of reach.
    assert (
        invoice_status_advance(
            organization="org_someone_else", invoice_id=invoice.pk, status=InvoiceStatus.VOID
        )
        == ""
    )


def _stored_draft(person: Person) -> Invoice:
    """January's invoice stored by a run while Stripe was off (so still a draft)."""
    with override_settings(STRIPE_API_KEY=""):
        invoice_run(period=JAN)
    invoice = the_invoice(person)
    assert invoice.status == InvoiceStatus.DRAFT
    return invoice


# --- 3. the monthly run end to end ------------------------------------------------------------


def stripe_items(customer: str) -> list[dict[str, Any]]:
    """Every invoice item of the customer, read through the gateway and the SDK it uses.

    localstripe lists only pending items (real Stripe lists all), so items already on an
    invoice are read from the invoices' lines; each carries the item's id and metadata.
    """
    items = gateway.pending_items_of(customer)
    for invoice in gateway.invoices_of(customer):
        lines = gateway.client().v1.invoices.line_items.list(invoice["id"], params={"limit": 100})
        for line in (line.to_dict() for line in lines.data):
            if line["type"] == "invoiceitem":
                items.append({**line, "id": line["invoice_item"], "invoice": invoice["id"]})
    return items


def db_counts(person: Person) -> tuple[int, int, int, int]:
    org = person.organization
    return (
        Invoice.objects.for_organization(org).count(),
        InvoiceLine.objects.for_organization(org).count(),
        StripeInvoice.objects.for_organization(org).count(),
        CreditGrant.objects.for_organization(org).count(),
    )


def test_the_monthly_run_bills_a_closed_month_through_stripe_once(
    alice: Person, charlie: Person, stripe: LocalStripe
) -> None:
    created_long_ago(alice)
    usage(alice, datetime(2026, 1, 5, tzinfo=UTC), prompt=5_000_000)  # $5.00
    usage(alice, datetime(2026, 2, 1, tzinfo=UTC), prompt=9_000_000)  # February: not this run
    credit_grant(
        organization=alice.organization,
        amount=Decimal("3.00"),
        source="purchase",
        idempotency_key="pi_e2e",
    )
    customer = billable(stripe, alice)

    # Stripe is down for the first run: the invoice is stored (credits drawn), not pushed.
    with override_settings(STRIPE_API_KEY=""):
        (created,) = invoice_run(period=JAN)
    assert stripe_items(customer) == []
    assert the_invoice(alice).status == InvoiceStatus.DRAFT

    # The next run creates nothing new in the ledger and pushes the draft.
    assert invoice_run(period=JAN) == []
    invoice = the_invoice(alice)
    assert invoice.pk == created
    # $5.00 of usage less the free plan's $1.00 included, then $3.00 of credit.
    assert (invoice.subtotal, invoice.credits_applied, invoice.total) == (
        Decimal("4.00"),
        Decimal("3.00"),
        Decimal("1.00"),
    )
    (remote,) = stripe_invoices(stripe, alice)
    assert (invoice.stripe_invoice_id, invoice.status) == (remote["id"], InvoiceStatus.PAID)
    assert remote["status"] == "paid"  # finalized and collected by `pay`
    assert remote["metadata"]["atelier_invoice_id"] == invoice.pk
    items = stripe_items(customer)
    # In cents: credit, included usage, usage.
    assert sorted(item["amount"] for item in items) == [-300, -100, 500]
    assert {item["invoice"] for item in items} == {remote["id"]}
    assert {item["metadata"]["atelier_invoice_line_id"] for item in items} == set(
        invoice.lines.values_list("pk", flat=True)
    )
    record = StripeInvoice.objects.for_organization(alice.organization).get()
    assert (record.invoice_id, record.stripe_invoice_id, record.status) == (
        invoice.pk,
        remote["id"],
        "paid",
    )

    # Running it again creates nothing, in Stripe or here, and draws no more credit.
    before = (len(stripe_items(customer)), len(stripe_invoices(stripe, alice)), db_counts(alice))
    assert invoice_run(period=JAN) == []
    after = (len(stripe_items(customer)), len(stripe_invoices(stripe, alice)), db_counts(alice))
    assert after == before
    assert credit_balance(alice.organization) == Decimal("0.00")
    assert the_invoice(alice).status == InvoiceStatus.PAID
    # An organization with nothing to bill gets no invoice and no Stripe customer.
    assert Invoice.objects.for_organization(charlie.organization).count() == 0
    assert not StripeCustomer.objects.for_organization(charlie.organization).exists()


def test_the_backfill_hands_live_subscriptions_plan_fees_to_stripe(
    alice: Person, charlie: Person
) -> None:
    """payments 0002: plan periods of subscriptions made before billed_by existed."""
    import importlib

    from django.apps import apps

    from controlplane.payments.models import Subscription

    backfill = importlib.import_module(
        "controlplane.payments.migrations.0002_plan_billed_by_backfill"
    ).backfill
    for person, status in ((alice, "active"), (charlie, "canceled")):
        plan_change(organization=person.organization, plan_code="pro")  # billed_by=invoice
        Subscription.objects.create(
            organization=person.organization,
            stripe_subscription_id="sub_x",
            plan="pro",
            status=status,
        )
    backfill(apps, None)

    def latest(person: Person) -> str:
        rows = PlanAssignment.objects.for_organization(person.organization)
        last = rows.order_by("effective_from", "created_at").last()
        assert last is not None
        return last.billed_by

    assert (latest(alice), latest(charlie)) == ("subscription", "invoice")
