"""Ledger entries and prices for billing tests."""

from __future__ import annotations

import itertools
from datetime import datetime
from decimal import Decimal

from controlplane.billing.ledger import Entry, ledger_append_many
from controlplane.billing.models import PriceBookEntry
from controlplane.billing.prices import price_set
from tests.support.people import Person

_keys = itertools.count()


def usage(
    person: Person,
    at: datetime,
    *,
    prompt: int = 0,
    completion: int = 0,
    model: str = "atelier-tiny-llama",
    api_key_id: str | None = None,
) -> str:
    """One inference request's entries (a fresh request id); returns the request id."""
    request_id = f"req-{next(_keys)}"
    from controlplane.billing.ledger import inference_entries

    ledger_append_many(
        inference_entries(
            organization_id=person.organization.pk,
            request_id=request_id,
            model=model,
            prompt_tokens=prompt,
            completion_tokens=completion,
            occurred_at=at,
            api_key_id=api_key_id,
        )
    )
    return request_id


def entry(person: Person, meter: str, quantity: int, at: datetime, model: str = "") -> Entry:
    return Entry(
        organization_id=person.organization.pk,
        idempotency_key=f"test:{next(_keys)}",
        meter=meter,
        quantity=quantity,
        occurred_at=at,
        source="test",
        model=model,
    )


def price(
    meter: str, unit_price: str, since: datetime, *, model: str = "*", per_units: int = 1_000_000
) -> PriceBookEntry:
    """A new price from `since` (through the service: the open row is closed)."""
    return price_set(
        meter=meter,
        model=model,
        unit_price=Decimal(unit_price),
        effective_from=since,
        per_units=per_units,
    )
