"""Reading the ledger: usage and costs in time buckets, partner earnings.

Buckets are cut in the database (`date_bin` from `start_time`), grouped by the
requested dimensions, and priced per entry by the price-book row in force at
the entry's `occurred_at` (`prices.PriceInForce`; a price stored on the entry beats
it): the same rule as rating.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from django.db import models
from django.db.models import Count, F, Func, Q, Sum, Value
from django.db.models.functions import Coalesce

from controlplane.tenancy.models import Organization

from .models import LedgerEntry, Meter
from .prices import PriceInForce

WIDTHS = {"1m": timedelta(minutes=1), "1h": timedelta(hours=1), "1d": timedelta(days=1)}
#: group_by name in the API -> ledger column.
USAGE_GROUPS = {
    "model": "model",
    "api_key_id": "api_key_id",
    "user_id": "member_id",
    "project_id": "project_id",
}
COST_GROUPS = {**USAGE_GROUPS, "line_item": "meter"}

_PRICE = models.DecimalField(max_digits=40, decimal_places=20)


class DateBin(Func):
    function = "date_bin"
    output_field = models.DateTimeField()


def priced(queryset: models.QuerySet[LedgerEntry]) -> models.QuerySet[LedgerEntry]:
    """Entries annotated with `cost`: quantity x price in force / per_units (exact)."""
    return queryset.annotate(
        cost=models.ExpressionWrapper(
            F("quantity")
            * Coalesce(F("unit_price"), PriceInForce("unit_price"), Value(Decimal(0)))
            / Coalesce(F("per_units"), PriceInForce("per_units"), Value(1)),
            output_field=_PRICE,
        )
    )


@dataclass(frozen=True)
class Window:
    start: datetime
    end: datetime
    width: timedelta
    groups: tuple[str, ...]


def _bucketed(organization: Organization, window: Window, columns: dict[str, str]) -> Any:
    return (
        LedgerEntry.objects.for_organization(organization)
        .filter(occurred_at__gte=window.start, occurred_at__lt=window.end)
        .exclude(meter=Meter.ROYALTY_TOKENS)
        .filter(engagement_id__isnull=True)
        .annotate(
            bucket=DateBin(
                Value(window.width, output_field=models.DurationField()),
                F("occurred_at"),
                Value(window.start, output_field=models.DateTimeField()),
            )
        )
        .values("bucket", *(columns[g] for g in window.groups))
    )


def usage_buckets(
    organization: Organization, window: Window
) -> dict[datetime, list[dict[str, Any]]]:
    """Per bucket start: one result per group, with every meter's quantity."""
    rows: Any = (
        _bucketed(organization, window, USAGE_GROUPS)
        .annotate(
            input_tokens=Sum("quantity", filter=Q(meter=Meter.PROMPT_TOKENS)),
            output_tokens=Sum("quantity", filter=Q(meter=Meter.COMPLETION_TOKENS)),
            num_model_requests=Count(
                "reference",
                distinct=True,
                filter=Q(meter__in=[Meter.PROMPT_TOKENS, Meter.COMPLETION_TOKENS]),
            ),
            training_tokens=Sum("quantity", filter=Q(meter=Meter.TRAINING_TOKENS)),
            compression_jobs=Sum("quantity", filter=Q(meter=Meter.COMPRESSION_JOB)),
            storage_mb_days=Sum("quantity", filter=Q(meter=Meter.STORAGE_MB_DAY)),
        )
        .order_by("bucket")
    )
    out: dict[datetime, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        result: dict[str, Any] = {"object": "organization.usage.result"}
        for name in USAGE_GROUPS:
            result[name] = row.get(USAGE_GROUPS[name]) if name in window.groups else None
        for name in (
            "input_tokens",
            "output_tokens",
            "num_model_requests",
            "training_tokens",
            "compression_jobs",
            "storage_mb_days",
        ):
            result[name] = int(row[name] or 0)
        out[row["bucket"]].append(result)
    return out


def cost_buckets(
    organization: Organization, window: Window
) -> dict[datetime, list[dict[str, Any]]]:
    """Per bucket start: one result per group with its amount in USD."""
    base = priced(
        LedgerEntry.objects.for_organization(organization)
        .filter(occurred_at__gte=window.start, occurred_at__lt=window.end)
        .exclude(meter=Meter.ROYALTY_TOKENS)
        .filter(engagement_id__isnull=True)
    ).annotate(
        bucket=DateBin(
            Value(window.width, output_field=models.DurationField()),
            F("occurred_at"),
            Value(window.start, output_field=models.DateTimeField()),
        )
    )
    rows = (
        base.values("bucket", *(COST_GROUPS[g] for g in window.groups))
        .annotate(amount=Sum("cost"))
        .order_by("bucket")
    )
    out: dict[datetime, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        result: dict[str, Any] = {
            "object": "organization.costs.result",
            "amount": {"value": _usd(row["amount"]), "currency": "usd"},
        }
        for name, column in COST_GROUPS.items():
            result[name] = row.get(column) if name in window.groups else None
        out[row["bucket"]].append(result)
    return out


def earnings_buckets(
    organization: Organization, window: Window
) -> dict[datetime, list[dict[str, Any]]]:
    """A data partner's royalties per bucket, per listing: tokens and amount earned."""
    rows = (
        priced(
            LedgerEntry.objects.for_organization(organization).filter(
                meter=Meter.ROYALTY_TOKENS,
                occurred_at__gte=window.start,
                occurred_at__lt=window.end,
            )
        )
        .annotate(
            bucket=DateBin(
                Value(window.width, output_field=models.DurationField()),
                F("occurred_at"),
                Value(window.start, output_field=models.DateTimeField()),
            )
        )
        .values("bucket", "model")
        .annotate(tokens=Sum("quantity"), amount=Sum("cost"), jobs=Count("reference"))
        .order_by("bucket", "model")
    )
    out: dict[datetime, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        out[row["bucket"]].append(
            {
                "object": "catalog.earnings.result",
                "listing_id": row["model"],
                "trained_tokens": int(row["tokens"] or 0),
                "num_jobs": int(row["jobs"]),
                "amount": {"value": _usd(row["amount"]), "currency": "usd"},
            }
        )
    return out


def _usd(amount: Decimal | None) -> float:
    # Costs API amounts are numbers; six decimals keeps sub-cent token costs visible.
    return float((amount or Decimal(0)).quantize(Decimal("0.000001")))
