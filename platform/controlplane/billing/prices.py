"""The price book: changing a price adds a row from a time on; history is never edited.

The price in force of a (meter, model) at a time is decided here, once: the row whose
[effective_from, effective_to) holds the time, the model's own row before the wildcard's.
It is written as SQL (`price_joins_sql`, `price_sql`), which every query that prices
applies inside itself, set-based: the invoice rating (`rating.py`), the usage and cost
selectors (`PriceInForce`) and `unit_prices`. `price_in_force` is the same rule over
rows already in memory (the budget spend, which cuts a period at price changes).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime
from decimal import Decimal

import structlog
from django.db import connection, transaction
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.models import F, Field, Func
from django.db.models.sql.compiler import SQLCompiler

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


def price_joins_sql(*, meter: str, model: str, at: str) -> str:
    """LEFT JOINs of the price-book rows in force for `meter` and `model` at `at` (SQL
    expressions): `ps` the model's own, `pw` the wildcard's; then `price_sql(column)`
    is the price in force's column, NULL where nothing prices it."""
    table = PriceBookEntry._meta.db_table
    return " ".join(
        f"LEFT JOIN {table} {p} ON {p}.meter = {meter} AND {match}"
        f" AND {p}.effective_from <= {at}"
        f" AND ({p}.effective_to IS NULL OR {at} < {p}.effective_to)"
        for p, match in (
            ("ps", f"ps.model = {model} AND ps.model <> '{WILDCARD}'"),
            ("pw", f"pw.model = '{WILDCARD}'"),
        )
    )


def price_sql(column: str) -> str:
    """The price in force's `column`, after `price_joins_sql`."""
    return f"COALESCE(ps.{column}, pw.{column})"


class PriceInForce(Func):
    """The price in force's `column` for each row of a ledger-entry query (its `meter`,
    `model` and `occurred_at`), NULL where nothing prices it: `price_joins_sql` as a
    scalar subquery."""

    def __init__(self, column: str) -> None:
        field = PriceBookEntry._meta.get_field(column)
        assert isinstance(field, Field)
        super().__init__(F("meter"), F("model"), F("occurred_at"), output_field=field)
        self.column = column

    def as_sql(  # type: ignore[override]
        self, compiler: SQLCompiler, connection: BaseDatabaseWrapper, **extra: object
    ) -> tuple[str, list[object]]:
        columns = []
        for expression in self.get_source_expressions():
            sql, params = compiler.compile(expression)
            if params:  # columns have none; the template repeats `at`
                raise ValueError("PriceInForce takes columns, not parameters")
            columns.append(sql)
        meter, model, at = columns
        joins = price_joins_sql(meter=meter, model=model, at=at)
        sql = f"(SELECT {price_sql(self.column)} FROM (SELECT 1) AS one {joins})"  # noqa: S608
        return sql, []  # (the fragments are code and compiled columns)


def unit_prices(model: str, meters: Sequence[str], at: datetime) -> tuple[Decimal, ...]:
    """USD per unit of each of `meters` for `model` at `at` (0 where unpriced): one query."""
    joins = price_joins_sql(meter="m.meter", model="%(model)s", at="%(at)s")
    query = (
        f"SELECT m.meter, {price_sql('unit_price')}, {price_sql('per_units')}"  # noqa: S608
        f" FROM unnest(%(meters)s::varchar[]) AS m(meter) {joins}"
    )
    with connection.cursor() as cursor:
        cursor.execute(query, {"model": model, "at": at, "meters": list(meters)})
        found = {meter: (price, per) for meter, price, per in cursor.fetchall()}
    out = []
    for meter in meters:
        price, per_units = found.get(meter, (None, 1))
        out.append(price / per_units if price is not None else Decimal(0))
    return tuple(out)
