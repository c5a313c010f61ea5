"""Rating and invoicing: month rollover, proration, credits applied once, idempotent runs."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

import pytest

from controlplane.billing.credits import credit_balance, credit_grant
from controlplane.billing.invoicing import invoice_run
from controlplane.billing.models import Invoice, InvoiceLine, Meter
from controlplane.billing.plans import plan_change
from controlplane.billing.rating import month_bounds, rate_period
from controlplane.billing.tasks import invoice_run as invoice_run_task
from controlplane.core.errors import ApiError
from controlplane.tenancy.models import Organization
from tests.controlplane.billing.factories import price, usage
from tests.support.people import Person, client_with, join
from tests.support.plans import set_plan

pytestmark = pytest.mark.django_db
JAN = date(2026, 1, 1)
SINCE = datetime(2024, 1, 1, tzinfo=UTC)


@pytest.fixture(autouse=True)
def _simple_prices() -> None:
    # $1 per 1M prompt tokens, $2 per 1M completion tokens; plans with no included usage.
    price(Meter.PROMPT_TOKENS, "1.00", SINCE)
    price(Meter.COMPLETION_TOKENS, "2.00", SINCE)
    set_plan("free", monthly_price=Decimal(0), included_amount=Decimal(0))
    set_plan("pro", monthly_price=Decimal("31.00"), included_amount=Decimal(0))


def _created_long_ago(person: Person) -> None:
    Organization.objects.filter(pk=person.organization.pk).update(
        created_at=datetime(2025, 1, 1, tzinfo=UTC)
    )
    person.organization.refresh_from_db()


def invoices(person: Person) -> list[Invoice]:
    return list(Invoice.objects.for_organization(person.organization).order_by("period_start"))


def test_an_event_at_the_last_millisecond_belongs_to_its_month(alice: Person) -> None:
    _created_long_ago(alice)
    last = datetime(2026, 1, 31, 23, 59, 59, 999000, tzinfo=UTC)
    usage(alice, last, prompt=1_000_000)
    usage(alice, last + timedelta(milliseconds=1), completion=1_000_000)  # 00:00 Feb 1st

    jan = rate_period(
        organization=alice.organization, start=month_bounds(JAN)[0], end=month_bounds(JAN)[1]
    )
    feb_start, feb_end = month_bounds(date(2026, 2, 1))
    feb = rate_period(organization=alice.organization, start=feb_start, end=feb_end)
    assert [(line.meter, line.amount) for line in jan] == [(Meter.PROMPT_TOKENS, Decimal("1.00"))]
    assert [(line.meter, line.amount) for line in feb] == [
        (Meter.COMPLETION_TOKENS, Decimal("2.00"))
    ]


def test_a_plan_change_mid_month_is_prorated_by_days(alice: Person) -> None:
    _created_long_ago(alice)
    # Free until Jan 11th, Pro from Jan 12th 00:00: 11 free days, 20 pro days of 31.
    plan_change(
        organization=alice.organization,
        plan_code="pro",
        at=datetime(2026, 1, 12, tzinfo=UTC),
    )
    start, end = month_bounds(JAN)
    lines = rate_period(organization=alice.organization, start=start, end=end)
    (fee,) = [line for line in lines if line.kind == "plan"]
    assert fee.amount == Decimal("20.00")  # 31.00 x 20/31
    assert fee.quantity == 20
    # A change during a day applies from the next day.
    plan_change(
        organization=alice.organization,
        plan_code="free",
        at=datetime(2026, 1, 21, 15, 0, tzinfo=UTC),
    )
    lines = rate_period(organization=alice.organization, start=start, end=end)
    (fee,) = [line for line in lines if line.kind == "plan"]
    assert (fee.quantity, fee.amount) == (10, Decimal("10.00"))  # Jan 12th..21st


def test_an_unknown_plan_is_refused_with_the_choices(alice: Person) -> None:
    with pytest.raises(ApiError, match="free"):
        plan_change(organization=alice.organization, plan_code="platinum")


def test_included_usage_covers_usage_but_never_goes_below_zero(alice: Person) -> None:
    _created_long_ago(alice)
    set_plan("free", included_amount=Decimal("1.50"))
    usage(alice, datetime(2026, 1, 5, tzinfo=UTC), prompt=1_000_000)  # $1.00
    start, end = month_bounds(JAN)
    lines = rate_period(organization=alice.organization, start=start, end=end)
    assert sum(line.amount for line in lines) == Decimal("0.00")
    assert [line.amount for line in lines if line.kind == "included"] == [Decimal("-1.00")]


def test_each_line_is_rounded_to_cents_once(alice: Person) -> None:
    _created_long_ago(alice)
    for day in (3, 4, 5):  # 3 x 5,000 tokens at $1/1M = $0.015 exactly -> $0.02 once
        usage(alice, datetime(2026, 1, day, tzinfo=UTC), prompt=5_000)
    start, end = month_bounds(JAN)
    (line,) = rate_period(organization=alice.organization, start=start, end=end)
    assert (line.quantity, line.amount) == (15_000, Decimal("0.02"))


def test_the_invoice_run_is_idempotent_and_applies_credits_once(
    alice: Person, charlie: Person
) -> None:
    _created_long_ago(alice)
    usage(alice, datetime(2026, 1, 5, tzinfo=UTC), prompt=3_000_000, completion=1_000_000)  # $5
    credit_grant(
        organization=alice.organization,
        amount=Decimal("3.00"),
        source="staff",
        idempotency_key="g1",
    )
    credit_grant(  # the same grant reported again adds nothing
        organization=alice.organization,
        amount=Decimal("3.00"),
        source="staff",
        idempotency_key="g1",
    )
    assert credit_balance(alice.organization) == Decimal("3.00")

    created = invoice_run(period=JAN)
    assert invoice_run(period=JAN) == []  # a second run creates nothing
    assert invoice_run_task("2026-01") == []  # nor does the beat task

    (invoice,) = invoices(alice)
    assert created == [invoice.pk]
    assert (invoice.subtotal, invoice.credits_applied, invoice.total) == (
        Decimal("5.00"),
        Decimal("3.00"),
        Decimal("2.00"),
    )
    assert credit_balance(alice.organization) == Decimal("0.00")
    kinds = sorted(
        InvoiceLine.objects.for_organization(alice.organization).values_list("kind", flat=True)
    )
    assert kinds == ["credit", "usage", "usage"]
    assert invoices(charlie) == []  # no usage, free plan: nothing to bill


def test_credits_left_over_carry_to_the_next_month(alice: Person) -> None:
    _created_long_ago(alice)
    credit_grant(
        organization=alice.organization,
        amount=Decimal("10.00"),
        source="purchase",
        idempotency_key="pi_1",
    )
    usage(alice, datetime(2026, 1, 5, tzinfo=UTC), prompt=4_000_000)
    usage(alice, datetime(2026, 2, 5, tzinfo=UTC), prompt=8_000_000)
    invoice_run(period=JAN)
    invoice_run(period=date(2026, 2, 1))
    jan, feb = invoices(alice)
    assert (jan.credits_applied, jan.total) == (Decimal("4.00"), Decimal("0.00"))
    assert (feb.credits_applied, feb.total) == (Decimal("6.00"), Decimal("2.00"))
    assert credit_balance(alice.organization) == Decimal("0.00")


def test_a_paid_plan_is_invoiced_without_usage(alice: Person) -> None:
    _created_long_ago(alice)
    plan_change(
        organization=alice.organization, plan_code="pro", at=datetime(2025, 6, 1, tzinfo=UTC)
    )
    invoice_run(period=JAN)
    (invoice,) = invoices(alice)
    assert invoice.total == Decimal("31.00")


def test_a_month_that_has_not_ended_is_not_invoiced(alice: Person) -> None:
    from django.utils import timezone

    with pytest.raises(ValueError, match="has not ended"):
        invoice_run(period=timezone.now().date())


def test_a_bad_credit_grant_is_refused(alice: Person) -> None:
    for amount, param in ((Decimal("-1"), "amount"), (Decimal("0.001"), "amount")):
        with pytest.raises(ApiError) as caught:
            credit_grant(
                organization=alice.organization, amount=amount, source="staff", idempotency_key="x"
            )
        assert caught.value.param == param
    with pytest.raises(ApiError):
        credit_grant(
            organization=alice.organization, amount=Decimal(1), source="gift", idempotency_key="y"
        )


# --- the endpoints ---------------------------------------------------------------------------


def test_members_list_and_read_their_invoices(alice: Person) -> None:
    _created_long_ago(alice)
    usage(alice, datetime(2026, 1, 5, tzinfo=UTC), prompt=2_000_000)
    invoice_run(period=JAN)
    listing = alice.client.get("/v1/organization/invoices").json()
    (item,) = listing["data"]
    assert listing["object"] == "list"
    assert (item["object"], item["total"], item["status"]) == ("invoice", "2.00", "draft")
    detail = alice.client.get(f"/v1/organization/invoices/{item['id']}").json()
    assert [(line["kind"], line["amount"], line["quantity"]) for line in detail["lines"]] == [
        ("usage", "2.00", 2_000_000)
    ]


def test_an_outsider_gets_404_for_a_foreign_invoice(alice: Person, charlie: Person) -> None:
    _created_long_ago(alice)
    usage(alice, datetime(2026, 1, 5, tzinfo=UTC), prompt=2_000_000)
    (invoice_id,) = invoice_run(period=JAN)
    response = charlie.client.get(f"/v1/organization/invoices/{invoice_id}")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"
    assert charlie.client.get("/v1/organization/invoices").json()["data"] == []
    assert charlie.client.get("/v1/organization/invoices/in_nope").status_code == 404


def test_the_upcoming_invoice_is_a_preview_that_stores_nothing(alice: Person) -> None:
    from django.utils import timezone

    credit_grant(
        organization=alice.organization, amount=Decimal("1.00"), source="staff", idempotency_key="g"
    )
    usage(alice, timezone.now(), prompt=3_000_000)
    body = alice.client.get("/v1/organization/invoices/upcoming").json()
    assert (body["status"], body["subtotal"], body["credits_applied"], body["total"]) == (
        "upcoming",
        "3.00",
        "1.00",
        "2.00",
    )
    assert invoices(alice) == []
    assert credit_balance(alice.organization) == Decimal("1.00")


@pytest.mark.parametrize(
    "path", ["/v1/organization/invoices", "/v1/organization/invoices/upcoming"]
)
def test_invoices_need_a_key_with_billing_read(alice: Person, path: str) -> None:
    assert client_with(None).get(path).status_code == 401
    viewer = join(alice.organization, "viewer@acme.test", "viewer")
    assert viewer.client.get(path).status_code == 403
    accountant = join(alice.organization, "billing@acme.test", "billing")
    assert accountant.client.get(path).status_code == 200


def test_a_malformed_invoice_list_query_is_a_400(alice: Person) -> None:
    response = alice.client.get("/v1/organization/invoices", {"limit": "many"})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "limit"
    response = alice.client.get("/v1/organization/invoices", {"limit": 10_000})
    assert response.status_code == 400


# --- who charges the plan fee: the invoice (staff-assigned plans) or a Stripe subscription ----


def test_a_plan_billed_by_a_subscription_is_shown_at_zero_and_not_charged(
    alice: Person,
) -> None:
    _created_long_ago(alice)
    set_plan("pro", monthly_price=Decimal("31.00"), included_amount=Decimal("2.00"))
    plan_change(
        organization=alice.organization,
        plan_code="pro",
        at=datetime(2025, 6, 1, tzinfo=UTC),
        billed_by="subscription",
    )
    usage(alice, datetime(2026, 1, 5, tzinfo=UTC), prompt=5_000_000)  # $5.00
    invoice_run(period=JAN)
    (invoice,) = invoices(alice)
    lines = {line.kind: line for line in invoice.lines.all()}
    assert (lines["plan"].amount, lines["plan"].quantity) == (Decimal("0.00"), 31)
    assert "charged by your subscription" in lines["plan"].description
    # The included usage of the subscribed plan still applies.
    assert lines["included"].amount == Decimal("-2.00")
    assert (invoice.subtotal, invoice.total) == (Decimal("3.00"), Decimal("3.00"))


def test_a_subscription_billed_plan_without_usage_makes_no_ledger_invoice(
    alice: Person,
) -> None:
    _created_long_ago(alice)
    plan_change(
        organization=alice.organization,
        plan_code="pro",
        at=datetime(2025, 6, 1, tzinfo=UTC),
        billed_by="subscription",
    )
    assert invoice_run(period=JAN) == []
    assert invoices(alice) == []


def test_a_month_split_between_staff_billing_and_a_subscription_charges_only_staff_days(
    alice: Person,
) -> None:
    _created_long_ago(alice)
    # Staff put Acme on Pro (invoiced); from Jan 11th a subscription to Pro charges it.
    plan_change(
        organization=alice.organization, plan_code="pro", at=datetime(2025, 6, 1, tzinfo=UTC)
    )
    plan_change(
        organization=alice.organization,
        plan_code="pro",
        at=datetime(2026, 1, 11, tzinfo=UTC),
        billed_by="subscription",
    )
    start, end = month_bounds(JAN)
    lines = rate_period(organization=alice.organization, start=start, end=end)
    fees = sorted((line.quantity, line.amount) for line in lines if line.kind == "plan")
    assert fees == [(10, Decimal("10.00")), (21, Decimal("0.00"))]  # 31.00 x 10/31 once


def test_plan_change_records_nothing_when_neither_plan_nor_payer_changes(
    alice: Person,
) -> None:
    from controlplane.billing.models import PlanAssignment

    history = PlanAssignment.objects.for_organization(alice.organization)
    plan_change(organization=alice.organization, plan_code="pro", billed_by="subscription")
    count = history.count()
    plan_change(organization=alice.organization, plan_code="pro", billed_by="subscription")
    assert history.count() == count
    plan_change(organization=alice.organization, plan_code="pro")  # staff takes over billing
    assert history.count() == count + 1
    assert history.order_by("effective_from", "created_at").last().billed_by == "invoice"
