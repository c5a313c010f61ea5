"""The Stripe gateway against localstripe: customers, plan mirroring, invoice push."""

from __future__ import annotations

import threading
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
from django.db import connection

from controlplane.billing.models import Invoice, InvoiceLine, InvoiceStatus, Plan
from controlplane.payments import gateway, services
from controlplane.payments.models import StripeCustomer, StripeInvoice
from controlplane.tenancy.models import Organization
from tests.support.localstripe import LocalStripe
from tests.support.people import Person

pytestmark = pytest.mark.django_db


@pytest.fixture
def stripe(stripe_settings: LocalStripe) -> LocalStripe:
    return stripe_settings


def test_customer_is_created_once_and_remembered(alice: Person, stripe: LocalStripe) -> None:
    first = gateway.customer_for(alice.organization)
    assert gateway.customer_for(alice.organization) == first
    remote = stripe.get(f"/v1/customers/{first}")
    assert remote["metadata"] == {"organization_id": alice.organization.pk}
    assert remote["name"] == "Acme"
    assert StripeCustomer.objects.for_organization(alice.organization).count() == 1


@pytest.mark.django_db(transaction=True)
def test_concurrent_first_calls_make_one_customer(alice: Person, stripe: LocalStripe) -> None:
    results: list[str] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def call() -> None:
        try:
            barrier.wait()
            org = Organization.objects.get(pk=alice.organization.pk)
            results.append(gateway.customer_for(org))
        except BaseException as exc:  # surfaced below
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=call) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(set(results)) == 1
    listed = stripe.get("/v1/customers", limit=100)["data"]
    mine = [c for c in listed if c["metadata"].get("organization_id") == alice.organization.pk]
    assert len(mine) == 1


def test_plan_sync_mirrors_once_and_makes_a_new_price_on_change(
    db: None, stripe: LocalStripe
) -> None:
    plan = Plan.objects.get(code="pro")
    plan.stripe_product_id = plan.stripe_price_id = ""
    plan.save()
    first = gateway.plan_sync(plan)
    product = plan.stripe_product_id
    assert first == "atelier-pro-2900-usd-month"
    assert gateway.plan_sync(plan) == first
    assert plan.stripe_product_id == product  # no second product
    remote = stripe.get(f"/v1/plans/{first}")
    assert (remote["amount"], remote["interval"], remote["product"]) == (2900, "month", product)
    plan.monthly_price = Decimal("39.00")
    plan.save()
    second = gateway.plan_sync(plan)
    assert second == "atelier-pro-3900-usd-month"
    assert Plan.objects.get(code="pro").stripe_price_id == second
    assert stripe.get(f"/v1/plans/{first}")["amount"] == 2900  # the old price is untouched


def test_plan_sync_survives_a_lost_save(db: None, stripe: LocalStripe) -> None:
    """Stripe has the plan, our row does not know it (an earlier sync died before saving)."""
    plan = Plan.objects.get(code="enterprise")
    gateway.plan_sync(plan)
    Plan.objects.filter(code="enterprise").update(stripe_price_id="")
    plan.refresh_from_db()
    assert gateway.plan_sync(plan) == "atelier-enterprise-50000-usd-month"


def test_without_a_key_the_gateway_refuses_clearly(alice: Person, settings: Any) -> None:
    settings.STRIPE_API_KEY = ""
    with pytest.raises(gateway.BillingDisabled, match="STRIPE_API_KEY"):
        gateway.customer_for(alice.organization)


def make_invoice(person: Person, amounts: list[str]) -> Invoice:
    org = person.organization
    invoice = Invoice.objects.create(
        organization=org,
        period_start=datetime(2026, 10, 1, tzinfo=UTC),
        period_end=datetime(2026, 11, 1, tzinfo=UTC),
        subtotal=sum(Decimal(a) for a in amounts),
        total=sum(Decimal(a) for a in amounts),
    )
    for n, amount in enumerate(amounts):
        InvoiceLine.objects.create(
            organization=org,
            invoice=invoice,
            kind="usage",
            description=f"line {n}",
            amount=Decimal(amount),
        )
    return invoice


def billable(stripe: LocalStripe, person: Person, card: str = "4242424242424242") -> str:
    customer = gateway.customer_for(person.organization)
    stripe.card(customer, card)
    stripe.allow_invoices(customer)
    return customer


def item_amounts(stripe: LocalStripe, stripe_id: str) -> list[int]:
    """Our invoice items' amounts on the Stripe invoice (not localstripe's $0 subscription line)."""
    lines = stripe.get(f"/v1/invoices/{stripe_id}/lines")["data"]
    return sorted(line["amount"] for line in lines if line["type"] == "invoiceitem")


def stripe_invoices(stripe: LocalStripe, person: Person) -> list[dict[str, Any]]:
    """The customer's invoices, less the one localstripe made when allow_invoices subscribed it."""
    customer = StripeCustomer.objects.for_organization(person.organization).get().stripe_id
    listed = stripe.get("/v1/invoices", customer=customer)["data"]
    return [inv for inv in listed if inv["metadata"].get("atelier_invoice_id")]


def test_invoice_push_creates_items_and_a_finalized_invoice(
    alice: Person, stripe: LocalStripe
) -> None:
    invoice = make_invoice(alice, ["12.345", "0.50", "-2.00"])
    billable(stripe, alice)
    stripe_id = services.invoice_push(organization=alice.organization, invoice=invoice)
    assert stripe_id
    (remote,) = stripe_invoices(stripe, alice)
    assert remote["id"] == stripe_id
    assert remote["metadata"]["atelier_invoice_id"] == invoice.pk
    assert remote["status"] == "paid"
    assert item_amounts(stripe, stripe_id) == [-200, 50, 1235]  # cents, half up
    invoice.refresh_from_db()
    assert (invoice.stripe_invoice_id, invoice.status) == (stripe_id, InvoiceStatus.PAID)


def test_pushing_twice_creates_nothing_new(alice: Person, stripe: LocalStripe) -> None:
    invoice = make_invoice(alice, ["5.00", "7.00"])
    billable(stripe, alice)
    first = services.invoice_push(organization=alice.organization, invoice=invoice)
    assert first
    second = services.invoice_push(organization=alice.organization, invoice=invoice)
    assert first == second
    assert len(stripe_invoices(stripe, alice)) == 1
    assert item_amounts(stripe, first) == [500, 700]


def test_a_push_that_died_after_some_items_resumes_without_duplicates(
    alice: Person, stripe: LocalStripe
) -> None:
    invoice = make_invoice(alice, ["5.00", "7.00", "9.00"])
    customer = billable(stripe, alice)
    # By description, not by id: ids made in one millisecond do not sort in creation order.
    first_line = invoice.lines.get(description="line 0")
    # The earlier attempt created one item, then the process died.
    gateway.invoice_item_create(
        customer=customer,
        amount_cents=500,
        currency="usd",
        description=first_line.description,
        metadata={"atelier_invoice_line_id": first_line.pk, "atelier_invoice_id": invoice.pk},
    )
    stripe_id = services.invoice_push(organization=alice.organization, invoice=invoice)
    assert stripe_id
    assert item_amounts(stripe, stripe_id) == [500, 700, 900]


def test_a_push_that_died_after_creating_the_invoice_finds_it(
    alice: Person, stripe: LocalStripe
) -> None:
    invoice = make_invoice(alice, ["5.00"])
    billable(stripe, alice)
    first = services.invoice_push(organization=alice.organization, invoice=invoice)
    # Our record of it is lost (rolled back): the push finds the invoice by its metadata.
    StripeInvoice.objects.for_organization(alice.organization).delete()
    assert services.invoice_push(organization=alice.organization, invoice=invoice) == first
    assert len(stripe_invoices(stripe, alice)) == 1


def test_a_declined_invoice_stays_open_and_pushed(alice: Person, stripe: LocalStripe) -> None:
    invoice = make_invoice(alice, ["5.00"])
    billable(stripe, alice, "4000000000000341")
    stripe_id = services.invoice_push(organization=alice.organization, invoice=invoice)
    assert stripe_invoices(stripe, alice)[0]["status"] == "open"
    record = StripeInvoice.objects.for_organization(alice.organization).get()
    assert (record.stripe_invoice_id, record.status) == (stripe_id, "open")
    invoice.refresh_from_db()
    assert invoice.status == InvoiceStatus.OPEN


def test_an_invoice_with_nothing_to_charge_is_not_pushed(
    alice: Person, stripe: LocalStripe
) -> None:
    invoice = make_invoice(alice, ["0.001"])
    assert services.invoice_push(organization=alice.organization, invoice=invoice) is None
    assert not StripeCustomer.objects.for_organization(alice.organization).exists()


def test_an_invoice_of_another_organization_is_refused(
    alice: Person, charlie: Person, stripe: LocalStripe
) -> None:
    invoice = make_invoice(charlie, ["5.00"])
    with pytest.raises(ValueError, match="another organization"):
        services.invoice_push(organization=alice.organization, invoice=invoice)


def test_a_credit_purchase_intent_is_granted_when_stripe_reports_it_paid(
    alice: Person, stripe: LocalStripe
) -> None:
    from controlplane.billing.models import CreditGrant

    from . import events

    intent = gateway.credit_payment_intent(
        organization=alice.organization, amount=Decimal("25.00"), key="test-credit-1"
    )
    card = stripe.card(gateway.customer_for(alice.organization))
    # What Stripe.js does in the browser (localstripe's confirm takes no payment_method).
    stripe.post(f"/v1/payment_intents/{intent['id']}", payment_method=card)
    paid = stripe.post(f"/v1/payment_intents/{intent['id']}/confirm")
    assert (paid["status"], paid["amount"]) == ("succeeded", 2500)
    # localstripe's own PaymentIntent object, delivered as Stripe would (signed).
    response = events.deliver(events.event("payment_intent.succeeded", paid))
    assert response.json()["outcome"] == "credits_granted"
    grants = CreditGrant.objects.for_organization(alice.organization)
    assert [(g.amount, g.source) for g in grants] == [(Decimal("25.00"), "purchase")]
