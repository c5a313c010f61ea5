"""Rating: the ledger priced by the price book, per meter x model, for a period.

Pricing is set-based SQL: ledger entries joined to the price-book row in force
at each entry's `occurred_at` (`prices.price_joins_sql`; a price stored on the
entry, as royalties have, beats it), grouped in the database.
A later price change adds a row for later times only, so it never changes what
earlier events cost.

Rounding: a line's exact amount (quantity x unit_price / per_units, in full
numeric precision) is rounded to cents once, ROUND_HALF_UP; totals are sums of
rounded lines.
"""

from __future__ import annotations

import calendar
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal

from django.db import connection

from controlplane.tenancy.models import Organization

from .models import Meter, Plan, PlanAssignment, PlanBilledBy
from .plans import _plan_by_code
from .prices import price_joins_sql, price_sql

CENT = Decimal("0.01")

# Every ledger charge of one organization (or all, when org is NULL) in [start, end),
# grouped by meter, model and the price that applied. Earnings (royalties) excluded, and
# charges to custom engagements (billed by milestone, not on the self-serve invoice).
_RATE = f"""
SELECT l.organization_id, l.meter, l.model,
       COALESCE(l.unit_price, {price_sql("unit_price")}) AS unit_price,
       COALESCE(l.per_units, {price_sql("per_units")}) AS per_units,
       COALESCE({price_sql("unit")}, '') AS unit,
       SUM(l.quantity)::bigint AS quantity
FROM billing_ledgerentry l
{price_joins_sql(meter="l.meter", model="l.model", at="l.occurred_at")}
WHERE l.occurred_at >= %(start)s AND l.occurred_at < %(end)s
  AND l.meter <> 'royalty.tokens'
  AND l.engagement_id IS NULL
  AND (%(org)s::varchar IS NULL OR l.organization_id = %(org)s::varchar)
GROUP BY 1, 2, 3, 4, 5, 6
ORDER BY 1, 2, 3, 4
"""  # noqa: S608 - the fragments are code, the values parameters


@dataclass(frozen=True)
class Line:
    """One invoice line: kind is plan | usage | included | credit."""

    kind: str
    description: str
    amount: Decimal
    meter: str = ""
    model: str = ""
    quantity: int = 0
    unit_price: Decimal | None = None
    per_units: int | None = None


def cents(amount: Decimal) -> Decimal:
    return amount.quantize(CENT, rounding=ROUND_HALF_UP)


def month_bounds(period: date) -> tuple[datetime, datetime]:
    """[first instant of period's month, first instant of the next) in UTC."""
    start = datetime(period.year, period.month, 1, tzinfo=UTC)
    days = calendar.monthrange(period.year, period.month)[1]
    return start, start + timedelta(days=days)


def usage_lines_all(*, start: datetime, end: datetime) -> dict[str, list[Line]]:
    """Usage lines of every organization with charges in [start, end), in one query."""
    return _usage_lines(start=start, end=end, org=None)


def _usage_lines(*, start: datetime, end: datetime, org: str | None) -> dict[str, list[Line]]:
    out: dict[str, list[Line]] = defaultdict(list)
    with connection.cursor() as cursor:
        cursor.execute(_RATE, {"start": start, "end": end, "org": org})
        for org_id, meter, model, unit_price, per_units, unit, quantity in cursor.fetchall():
            label = Meter(meter).label if meter in Meter.values else meter
            if unit_price is None:
                # No price in force: shown at zero, so it is visible rather than silently lost.
                amount, description = Decimal(0), f"{label} ({model or 'any'}): no price set"
            else:
                amount = cents(Decimal(quantity) * unit_price / Decimal(per_units))
                description = f"{label} ({model or 'any'}) at {unit_price.normalize()}/{unit}"
            out[org_id].append(
                Line(
                    kind="usage",
                    description=description,
                    amount=amount,
                    meter=meter,
                    model=model,
                    quantity=int(quantity),
                    unit_price=unit_price,
                    per_units=per_units,
                )
            )
    return out


def plan_days(
    organization: Organization, *, start: datetime, end: datetime
) -> list[tuple[Plan, str, int]]:
    """(plan, billed_by, days) for each plan (and who billed it) in force in [start, end).

    A day (UTC) is billed at the assignment in force at its first instant: a
    change made during a day takes effect for billing from the next day. Days
    before the organization existed are not billed. `billed_by` is a
    PlanBilledBy value: `subscription` days are charged by the Stripe
    subscription, not by the invoice.
    """
    assignments = list(
        PlanAssignment.objects.for_organization(organization)
        .filter(effective_from__lt=end)
        .select_related("plan")
        .order_by("effective_from", "created_at")
    )
    first_day = max(
        start, datetime.combine(organization.created_at.date(), datetime.min.time(), UTC)
    )
    counts: dict[tuple[str, str], int] = {}
    plans: dict[str, Plan] = {}
    day = first_day
    while day < end:
        current: PlanAssignment | None = None
        for assignment in assignments:
            if assignment.effective_from <= day:
                current = assignment
        if current is None:
            plan = _plan_by_code(assignments[0].plan_id if assignments else organization.plan)
            billed_by = str(PlanBilledBy.INVOICE)
        else:
            plan, billed_by = current.plan, current.billed_by
        plans[plan.code] = plan
        counts[(plan.code, billed_by)] = counts.get((plan.code, billed_by), 0) + 1
        day += timedelta(days=1)
    return [(plans[code], billed_by, n) for (code, billed_by), n in counts.items()]


def rate_period(
    *,
    organization: Organization,
    start: datetime,
    end: datetime,
    usage: list[Line] | None = None,
) -> list[Line]:
    """The lines of an organization's bill for [start, end) (a calendar month).

    Plan fees prorated by days, usage per meter x model x price, and the plan's
    included amount (prorated the same way) subtracted from usage, never below
    zero. Plan days billed by a Stripe subscription (PlanBilledBy.SUBSCRIPTION)
    appear as a `plan` line of amount 0: the subscription charges that fee, so
    the invoice must not; their included usage still applies. Credits are not
    applied here (see invoicing). Pure read: stores nothing.
    `usage` lets a caller that rated every organization at once pass its lines.
    """
    month_days = (end - start).days
    lines: list[Line] = []
    included = Decimal(0)
    for plan, billed_by, days in plan_days(organization, start=start, end=end):
        share = Decimal(days) / Decimal(month_days)
        if plan.monthly_price > 0 and billed_by == PlanBilledBy.SUBSCRIPTION:
            # The Stripe subscription charges this fee on its own invoice: shown, not charged.
            lines.append(
                Line(
                    kind="plan",
                    description=(
                        f"{plan.name} plan, {days}/{month_days} days: charged by your subscription"
                    ),
                    amount=Decimal("0.00"),
                    quantity=days,
                )
            )
        elif plan.monthly_price > 0:
            lines.append(
                Line(
                    kind="plan",
                    description=f"{plan.name} plan, {days}/{month_days} days",
                    amount=cents(plan.monthly_price * share),
                    quantity=days,
                    unit_price=plan.monthly_price,
                    per_units=month_days,
                )
            )
        included += plan.included_amount * share
    if usage is None:
        usage = _usage_lines(start=start, end=end, org=organization.pk).get(organization.pk, [])
    lines.extend(usage)
    used = sum((line.amount for line in usage), Decimal(0))
    deduct = min(cents(included), used)
    if deduct > 0:
        lines.append(
            Line(kind="included", description="Usage included in the plan", amount=-deduct)
        )
    return lines
