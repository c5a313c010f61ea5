"""The price in force (`billing/prices.py`): one rule, the same for admission and rating."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from controlplane.billing.ledger import ledger_append_many
from controlplane.billing.models import Meter
from controlplane.billing.prices import unit_prices
from controlplane.billing.rating import usage_lines_all
from tests.controlplane.billing.factories import entry, price
from tests.support.people import Person

pytestmark = pytest.mark.django_db

T0 = datetime(2026, 3, 1, tzinfo=UTC)
T1 = datetime(2026, 3, 10, tzinfo=UTC)
TICK = timedelta(microseconds=1)
MILLION = Decimal(1_000_000)


def _book() -> None:
    # (The migrations' wildcard prices are closed at T0.)
    price(Meter.PROMPT_TOKENS, "1", since=T0)
    price(Meter.PROMPT_TOKENS, "3", since=T1)  # closes the first at T1
    price(Meter.PROMPT_TOKENS, "7", since=T1, model="big")


@pytest.mark.parametrize(
    ("model", "at", "expected"),
    [
        ("small", T0, "1"),
        ("small", T1 - TICK, "1"),
        ("small", T1, "3"),  # from its start, the new wildcard price
        ("big", T1 - TICK, "1"),  # the model's own price is not yet in force
        ("big", T1, "7"),  # then it beats the wildcard
    ],
)
def test_unit_prices_are_the_models_own_else_the_wildcard_in_force_at_the_time(
    model: str, at: datetime, expected: str
) -> None:
    _book()

    (prompt,) = unit_prices(model, (Meter.PROMPT_TOKENS,), at)

    assert prompt == Decimal(expected) / MILLION


def test_rating_prices_each_entry_as_unit_prices_does(alice: Person) -> None:
    _book()
    cases = [("small", T1 - TICK), ("small", T1), ("big", T1 - TICK), ("big", T1)]
    ledger_append_many([entry(alice, Meter.PROMPT_TOKENS, 1, at, model) for model, at in cases])

    lines = usage_lines_all(start=T0, end=T1 + timedelta(days=1))[alice.organization.pk]

    rated = sorted((line.model, line.unit_price / line.per_units) for line in lines)  # type: ignore[operator]
    expected = sorted(
        (model, unit_prices(model, (Meter.PROMPT_TOKENS,), at)[0]) for model, at in cases
    )
    assert rated == expected
