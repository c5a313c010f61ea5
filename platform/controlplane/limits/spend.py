"""What an organization (or one of its keys) spent in a time range, rated from the ledger.

The budget counters in Redis are a fast copy; this is the truth they are rebuilt
from when Redis has lost them (a restart without persistence, an eviction, a
failover). Runs only then, off the steady-state request path.

Rating: cost = quantity x unit_price / per_units. An entry's own price (a
listing's royalty) wins; otherwise the price book entry in force when it
occurred, the model's own row before the `*` row. Earning meters (royalties
credited to a partner) are not spend.
"""

from __future__ import annotations

import itertools
from collections.abc import Collection
from datetime import datetime
from decimal import Decimal

import structlog
from django.db.models import Q, Sum

from controlplane.billing.models import (
    EARNING_METERS,
    WILDCARD,
    LedgerEntry,
    Meter,
    PriceBookEntry,
)
from controlplane.billing.prices import price_in_force

log = structlog.get_logger(__name__)

#: What a budget counts: inference spend only (prompt and completion tokens). Budgets
#: are enforced where inference is admitted: a request reserves its maximum cost and
#: settles its actual cost, and that live count is all a budget's counter holds.
#: Training, compression and storage are invoiced, not budgeted (a hard budget never
#: refuses inference because of a fine-tuning job it had no say over). The rebuild
#: from the ledger counts these meters and no others, so it equals the live counter.
BUDGETED_METERS: frozenset[str] = frozenset({Meter.PROMPT_TOKENS, Meter.COMPLETION_TOKENS})


def ledger_spend(
    *,
    organization_id: str,
    api_key_id: str | None,
    start: datetime,
    end: datetime,
    meters: Collection[str] | None = None,
) -> Decimal:
    """USD spent in [start, end) by the organization, or by one key when `api_key_id` is set,
    on every meter that is spend, or only on `meters` (budgets: BUDGETED_METERS).

    Exact for prices that change inside the range: the range is cut at every
    price change of each (meter, model) and each piece summed at its own price.
    """
    entries = (
        LedgerEntry.objects.for_organization(organization_id)
        .filter(occurred_at__gte=start, occurred_at__lt=end)
        .exclude(meter__in=EARNING_METERS)
        # A custom engagement's charges are the engagement's budget, not the organization's.
        .filter(engagement_id__isnull=True)
    )
    if meters is not None:
        entries = entries.filter(meter__in=list(meters))
    if api_key_id is not None:
        entries = entries.filter(api_key_id=api_key_id)
    total = Decimal(0)
    # Entries priced at the source.
    for row in (
        entries.filter(unit_price__isnull=False)
        .values("unit_price", "per_units")
        .annotate(quantity=Sum("quantity"))
    ):
        total += row["quantity"] * row["unit_price"] / (row["per_units"] or 1)
    book = entries.filter(unit_price__isnull=True)
    groups = list(book.values_list("meter", "model").distinct())
    if not groups:
        return total
    prices = list(
        PriceBookEntry.objects.filter(
            Q(effective_to__isnull=True) | Q(effective_to__gt=start),
            meter__in={meter for meter, _ in groups},
            effective_from__lt=end,
        ).order_by("-effective_from")
    )
    for meter, model in groups:
        cuts = {start, end}
        for p in prices:
            if p.meter == meter and p.model in (model, WILDCARD):
                cuts |= {t for t in (p.effective_from, p.effective_to) if t and start < t < end}
        edges = sorted(cuts)
        for lo, hi in itertools.pairwise(edges):
            quantity = book.filter(
                meter=meter, model=model, occurred_at__gte=lo, occurred_at__lt=hi
            ).aggregate(q=Sum("quantity"))["q"]
            if not quantity:
                continue
            price = price_in_force(prices, meter, model, lo)
            if price is None:
                log.warning(
                    "limits.unpriced_usage",
                    organization_id=organization_id,
                    meter=meter,
                    model=model,
                    quantity=quantity,
                )
                continue
            total += quantity * price.unit_price / price.per_units
    return total
