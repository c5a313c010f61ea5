"""The price book: changing a price adds a row from a time on; history is never edited.

The price in force of a (meter, model) at a time is decided here, once (`price_in_force`):
the row whose [effective_from, effective_to) holds the time, the model's own row before
the wildcard's. The invoice rating (SQL, `rating.py`) and the usage selectors apply the
same rule inside their queries.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime
from decimal import Decimal

import structlog
from django.db import transaction
from django.db.models import Q

from .models import WILDCARD, Meter, PriceBookEntry

log = structlog.get_logger(__name__)


@transaction.atomic
def price_set(
    *,
    meter: str,
    unit_price: Decimal,
    effective_from: datetime,
    model: str = WILDCARD,
    per_units: int = 1_000_000,
    unit: str = "1M tokens",
) -> PriceBookEntry:
    """Price `meter` (for `model`, or `*`) at `unit_price` per `per_units` from `effective_from`.

    The open row for the same meter and model is closed at `effective_from`;
    events before it keep their old price. Refuses (ValueError) a start at or
    before the open row's own start: that would rewrite history.
    """
    if meter not in Meter.values:
        raise ValueError(f"unknown meter {meter!r}")
    if unit_price < 0 or per_units < 1:
        raise ValueError("a price is non-negative, per at least one unit")
    current = (
        PriceBookEntry.objects.select_for_update()
        .filter(meter=meter, model=model, effective_to__isnull=True)
        .first()
    )
    if current is not None:
        if effective_from <= current.effective_from:
            raise ValueError(
                f"{meter}/{model} is priced from {current.effective_from.isoformat()}: a new "
                "price must start later (history is never rewritten)"
            )
        current.effective_to = effective_from
        current.save(update_fields=["effective_to"])
    entry = PriceBookEntry.objects.create(
        meter=meter,
        model=model,
        unit=unit,
        per_units=per_units,
        unit_price=unit_price,
        effective_from=effective_from,
    )
    log.info("billing.price_set", meter=meter, model=model, unit_price=str(unit_price))
    return entry


def price_in_force(
    prices: Iterable[PriceBookEntry], meter: str, model: str, at: datetime
) -> PriceBookEntry | None:
    """Of `prices`, the row that prices `meter` for `model` at `at` (None: unpriced)."""
    wildcard = None
    for p in prices:
        if p.meter != meter or p.effective_from > at:
            continue
        if p.effective_to is not None and at >= p.effective_to:
            continue
        if p.model == model and model != WILDCARD:
            return p
        if p.model == WILDCARD and wildcard is None:
            wildcard = p
    return wildcard


def unit_prices(model: str, meters: Sequence[str], at: datetime) -> tuple[Decimal, ...]:
    """USD per unit of each of `meters` for `model` at `at` (0 where unpriced): one query."""
    in_force = Q(effective_from__lte=at) & (Q(effective_to__isnull=True) | Q(effective_to__gt=at))
    rows = list(
        PriceBookEntry.objects.filter(in_force, meter__in=list(meters), model__in=[model, WILDCARD])
    )
    out = []
    for meter in meters:
        row = price_in_force(rows, meter, model, at)
        out.append(row.unit_price / row.per_units if row is not None else Decimal(0))
    return tuple(out)
