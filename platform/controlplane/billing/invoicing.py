"""Monthly invoicing: rate the closed month, apply credits, store, push to Stripe.

`invoice_run(period=...)` is idempotent: an organization's invoice for a month
is unique (organization, period_start), created under a lock on the
organization row, and credits are drawn in the same transaction. Running it
again creates nothing new; it only retries the Stripe push of invoices still
in `draft` (e.g. Stripe was down the first time).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from typing import Any, Protocol

import structlog
from django.db import transaction
from django.db.models import F, Q, Value
from django.db.models.functions import Coalesce
from django.utils import timezone

from controlplane.tenancy.models import Organization

from .credits import credit_balance
from .models import Invoice, InvoiceLine, InvoiceStatus, Plan, PlanAssignment
from .rating import Line, month_bounds, rate_period, usage_lines_all
from .signals import invoice_status_changed

log = structlog.get_logger(__name__)


class InvoicePush(Protocol):
    def __call__(self, *, organization: Organization, invoice: Invoice) -> str | None: ...


@dataclass(frozen=True)
class Collector:
    """Who collects stored invoices. Payments registers Stripe's at start-up
    (`PaymentsConfig.ready`): billing sits below payments and never imports it."""

    #: Whether invoices can be handed over now (Stripe: STRIPE_API_KEY is set).
    enabled: Callable[[], bool]
    #: Hand one invoice over, idempotently: the processor's invoice id, or None when
    #: the invoice charges nothing.
    push: InvoicePush


_collector: Collector | None = None


def invoice_collector_set(collector: Collector) -> None:
    """Register the one invoice collector (payments' Stripe push)."""
    global _collector
    _collector = collector


@dataclass(frozen=True)
class Preview:
    period_start: datetime
    period_end: datetime
    lines: list[Line]
    subtotal: Decimal
    credits_applied: Decimal
    total: Decimal


def _with_credits(lines: list[Line], balance: Decimal) -> tuple[Decimal, Decimal, Decimal]:
    subtotal = sum((line.amount for line in lines), Decimal(0))
    applied = max(Decimal(0), min(balance, subtotal))
    return subtotal, applied, subtotal - applied


def invoice_preview(*, organization: Organization, at: datetime | None = None) -> Preview:
    """What the current month's invoice would be if it closed now. Stores nothing.

    Credits are shown as they would apply from today's balance.
    """
    start, end = month_bounds((at or timezone.now()).date())
    lines = rate_period(organization=organization, start=start, end=end)
    subtotal, applied, total = _with_credits(lines, credit_balance(organization))
    return Preview(start, end, lines, subtotal, applied, total)


#: How far along each status is: a stored status only ever moves to a later one.
_STATUS_RANK = {
    InvoiceStatus.DRAFT: 0,
    InvoiceStatus.OPEN: 1,
    InvoiceStatus.PAID: 2,
    InvoiceStatus.VOID: 2,
}


def invoice_status_advance(
    *,
    organization: Organization | str,
    invoice_id: str,
    status: str,
    stripe_invoice_id: str = "",
    pushed: bool = False,
) -> str:
    """Move a ledger invoice's status forward (draft < open < paid | void), never back.

    Why: the push (payments.services.invoice_push, then this module's wrapper)
    and Stripe's `invoice.paid` webhook write the same row from different
    processes, in no fixed order. Each move is one conditional UPDATE (`WHERE
    status IN (<earlier>)`), so they serialise on the row, a late `open` cannot
    undo a `paid`, and the one write that moved it sends `invoice_status_changed`.
    Also stores the Stripe invoice id (when given) and `pushed_at` (when `pushed`,
    only if unset). Returns the status stored afterwards ('' if there is no such
    invoice in the organization). Blocking (one or two UPDATEs, one SELECT).
    """
    earlier = [s for s, rank in _STATUS_RANK.items() if rank < _STATUS_RANK[InvoiceStatus(status)]]
    updates: dict[str, Any] = {}
    if stripe_invoice_id:
        updates["stripe_invoice_id"] = stripe_invoice_id
    if pushed:
        updates["pushed_at"] = Coalesce(F("pushed_at"), Value(timezone.now()))
    rows = Invoice.objects.for_organization(organization).filter(pk=invoice_id)
    # The status moves only where it is still earlier (re-checked on the locked row, so of
    # two racing writers one moves it and announces it); the other fields in any case.
    if rows.filter(status__in=earlier).update(status=status, **updates):
        org_id = organization if isinstance(organization, str) else organization.pk
        invoice_status_changed.send(
            sender=Invoice, organization_id=org_id, invoice_id=invoice_id, status=status
        )
    elif updates:
        rows.update(**updates)
    return rows.values_list("status", flat=True).first() or ""


def invoice_push(*, organization: Organization, invoice: Invoice) -> bool:
    """Hand a stored invoice to Stripe; True once Stripe holds it (or it charges nothing).

    The one interface to the registered `Collector` (payments.services.invoice_push,
    idempotent there: items keyed by line id), which stores the Stripe id and moves the
    status on as Stripe reports it (`paid` when collected at once, else `open`;
    a Stripe invoice left in draft leaves ours `draft`, so the next run retries).
    An invoice with nothing to charge becomes `paid`. Statuses only move forward
    (`invoice_status_advance`): a `paid` set meanwhile by a webhook stays. `invoice`
    is refreshed from the database afterwards. While Stripe is off (no
    STRIPE_API_KEY) the invoice stays `draft` and the next run retries; Stripe
    errors propagate to the caller.
    """
    collector = _collector
    if collector is None or not collector.enabled():
        log.info("billing.invoice_push_skipped", invoice_id=invoice.pk, reason="stripe_off")
        return False
    stripe_id = collector.push(organization=organization, invoice=invoice)
    if stripe_id is None:
        invoice_status_advance(
            organization=organization, invoice_id=invoice.pk, status=InvoiceStatus.PAID, pushed=True
        )
    invoice.refresh_from_db(fields=["stripe_invoice_id", "status", "pushed_at"])
    log.info(
        "billing.invoice_pushed",
        invoice_id=invoice.pk,
        stripe_invoice_id=stripe_id,
        status=invoice.status,
    )
    return True


def _billable_organizations(start: datetime, end: datetime, with_usage: set[str]) -> list[str]:
    paid_plans = set(Plan.objects.filter(monthly_price__gt=0).values_list("code", flat=True))
    on_paid = set(
        Organization.objects.filter(Q(plan__in=paid_plans), created_at__lt=end).values_list(
            "pk", flat=True
        )
    )
    were_on_paid = set(
        PlanAssignment.objects.dangerously_unscoped()
        .filter(plan__in=paid_plans, effective_from__lt=end)
        .values_list("organization_id", flat=True)
    )
    return sorted(with_usage | on_paid | were_on_paid)


@transaction.atomic
def _invoice_store(
    *, organization_id: str, start: datetime, end: datetime, usage: list[Line]
) -> Invoice | None:
    organization = Organization.objects.select_for_update().get(pk=organization_id)
    existing = Invoice.objects.for_organization(organization).filter(period_start=start).first()
    if existing is not None:
        return None
    lines = rate_period(organization=organization, start=start, end=end, usage=usage)
    subtotal, applied, total = _with_credits(lines, credit_balance(organization))
    if not usage and not any(line.amount for line in lines):
        # No usage and nothing charged (e.g. a plan whose fee a Stripe subscription
        # charges): the subscription's own invoice is the whole bill.
        return None
    invoice = Invoice.objects.create(
        organization=organization,
        period_start=start,
        period_end=end,
        subtotal=subtotal,
        credits_applied=applied,
        total=total,
    )
    rows = [
        InvoiceLine(
            organization=organization,
            invoice=invoice,
            kind=line.kind,
            meter=line.meter,
            model=line.model,
            description=line.description,
            quantity=line.quantity,
            unit_price=line.unit_price,
            per_units=line.per_units,
            amount=line.amount,
        )
        for line in lines
    ]
    if applied > 0:
        rows.append(
            InvoiceLine(
                organization=organization,
                invoice=invoice,
                kind="credit",
                description="Prepaid credit applied",
                amount=-applied,
            )
        )
    InvoiceLine.objects.for_organization(organization).bulk_create(rows)
    log.info(
        "billing.invoice_created",
        organization_id=organization.pk,
        invoice_id=invoice.pk,
        total=str(total),
        credits_applied=str(applied),
    )
    return invoice


def invoice_run(*, period: date) -> list[str]:
    """Invoice every organization with usage or a plan fee for `period`'s month.

    Returns the ids of invoices created by this run (empty on a rerun). Rates
    all organizations' usage in one set-based query, then stores each invoice
    in its own transaction (one failure does not undo the others), then pushes
    drafts to Stripe. The month must be over.
    """
    start, end = month_bounds(period)
    if end > timezone.now():
        raise ValueError(f"The month of {period:%Y-%m} has not ended: invoice it after {end}.")
    usage = usage_lines_all(start=start, end=end)
    created: list[str] = []
    for org_id in _billable_organizations(start, end, set(usage)):
        invoice = _invoice_store(
            organization_id=org_id, start=start, end=end, usage=usage.get(org_id, [])
        )
        if invoice is not None:
            created.append(invoice.pk)
    drafts = Invoice.objects.dangerously_unscoped().filter(
        period_start=start, status=InvoiceStatus.DRAFT
    )
    for invoice in drafts.select_related("organization"):
        try:
            invoice_push(organization=invoice.organization, invoice=invoice)
        except Exception:  # one customer's Stripe failure must not stop the others
            log.exception("billing.invoice_push_failed", invoice_id=invoice.pk)
    log.info("billing.invoice_run_done", period=f"{period:%Y-%m}", created=len(created))
    return created
