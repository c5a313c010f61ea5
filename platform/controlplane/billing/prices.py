"""The price book: changing a price adds a row from a time on; history is never edited."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal

import structlog
from django.db import transaction

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
