"""Billing endpoints: usage and costs (OpenAI's Usage/Costs API shapes), invoices, earnings.

All read money or usage of the caller's organization, so they need `billing.read`
(owners, admins and billing members; the same scope as
/v1/organization/inference_usage).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import serializers
from rest_framework.request import Request
from rest_framework.response import Response

from controlplane.core.errors import ApiError
from controlplane.core.pagination import list_response, paginate
from controlplane.core.serializers import unix
from controlplane.tenancy.apis_base import OrganizationApi
from controlplane.tenancy.models import Organization

from . import selectors
from .invoicing import invoice_preview
from .models import Invoice
from .rating import Line

#: Per bucket width: (default, most) buckets per page, as OpenAI's Usage API.
BUCKET_LIMITS = {"1m": (60, 1440), "1h": (24, 168), "1d": (7, 31)}
#: 2100-01-01: later timestamps are typos (milliseconds for seconds).
MAX_TIME = 4_102_444_800

_WINDOW_PARAMS = [
    OpenApiParameter("start_time", int, required=True, description="Unix seconds, inclusive."),
    OpenApiParameter("end_time", int, description="Unix seconds, exclusive (default: now)."),
    OpenApiParameter("bucket_width", str, enum=["1m", "1h", "1d"]),
    OpenApiParameter("group_by", str, many=True),
    OpenApiParameter("limit", int, description="Buckets per page."),
    OpenApiParameter("page", str, description="next_page of the previous response."),
]


class WindowInput(serializers.Serializer[Any]):
    start_time = serializers.IntegerField(min_value=0, max_value=MAX_TIME)
    end_time = serializers.IntegerField(min_value=1, max_value=MAX_TIME, required=False)
    bucket_width = serializers.ChoiceField(choices=list(BUCKET_LIMITS), default="1d")
    limit = serializers.IntegerField(min_value=1, required=False)
    page = serializers.IntegerField(min_value=0, max_value=MAX_TIME, required=False)


def _window(request: Request, groups: dict[str, str]) -> tuple[selectors.Window, int, int]:
    """(window of this page, page's first bucket start, the query's end) from query params."""
    params = request.query_params
    data = {k: params.get(k) for k in ("start_time", "end_time", "bucket_width", "limit", "page")}
    serializer = WindowInput(data={k: v for k, v in data.items() if v is not None})
    serializer.is_valid(raise_exception=True)
    values = serializer.validated_data
    width_name: str = values["bucket_width"]
    default, most = BUCKET_LIMITS[width_name]
    limit = values.get("limit", default)
    if limit > most:
        raise ApiError(
            f"'limit' can be at most {most} for bucket_width={width_name}.",
            param="limit",
            code="invalid_value",
        )
    start: int = values["start_time"]
    # Default: now, rounded up: an event of this very second is in (truncating left it out).
    end: int = values.get("end_time") or math.ceil(datetime.now(UTC).timestamp())
    if end <= start:
        raise ApiError(
            "'end_time' (default: now) must be after 'start_time'.",
            param="end_time",
            code="invalid_value",
        )
    width = selectors.WIDTHS[width_name]
    step = int(width.total_seconds())
    page_start = values.get("page", start)
    if page_start < start or (page_start - start) % step:
        raise ApiError(
            "'page' is not a page of this query: pass the next_page of the previous response.",
            param="page",
            code="invalid_value",
        )
    names: list[str] = []
    for raw in params.getlist("group_by") + params.getlist("group_by[]"):
        names += [name.strip() for name in raw.split(",") if name.strip()]
    for name in names:
        if name not in groups:
            raise ApiError(
                f"Cannot group by '{name}': use any of {', '.join(groups)}.",
                param="group_by",
                code="invalid_value",
            )
    page_end = min(end, page_start + limit * step)
    window = selectors.Window(
        start=datetime.fromtimestamp(page_start, UTC),
        end=datetime.fromtimestamp(page_end, UTC),
        width=width,
        groups=tuple(dict.fromkeys(names)),
    )
    return window, page_end, end


def _page(
    window: selectors.Window,
    page_end: int,
    end: int,
    results: dict[datetime, list[dict[str, Any]]],
) -> Response:
    buckets = []
    at = window.start
    while at < window.end:
        close = min(at + window.width, window.end)
        buckets.append(
            {
                "object": "bucket",
                "start_time": unix(at),
                "end_time": unix(close),
                "results": results.get(at, []),
            }
        )
        at += window.width
    has_more = page_end < end
    return Response(
        {
            "object": "page",
            "data": buckets,
            "has_more": has_more,
            "next_page": str(page_end) if has_more else None,
        }
    )


class _WindowApi(OrganizationApi):
    scopes = {"read": "billing.read"}
    groups: dict[str, str] = {}
    read: Callable[[Organization, selectors.Window], dict[datetime, list[dict[str, Any]]]]

    def get(self, request: Request) -> Response:
        window, page_end, end = _window(request, self.groups)
        return _page(window, page_end, end, type(self).read(self.organization, window))


class OrganizationUsageApi(_WindowApi):
    """Usage from the ledger in time buckets: tokens, requests, training, storage."""

    groups = selectors.USAGE_GROUPS
    read = staticmethod(selectors.usage_buckets)

    @extend_schema(
        operation_id="organization_usage", parameters=_WINDOW_PARAMS, responses={200: dict}
    )
    def get(self, request: Request) -> Response:
        return super().get(request)


class OrganizationCostsApi(_WindowApi):
    """Costs in USD in time buckets, each event priced at the price in force when it ran."""

    groups = selectors.COST_GROUPS
    read = staticmethod(selectors.cost_buckets)

    @extend_schema(
        operation_id="organization_costs", parameters=_WINDOW_PARAMS, responses={200: dict}
    )
    def get(self, request: Request) -> Response:
        return super().get(request)


class CatalogEarningsApi(_WindowApi):
    """A data partner's royalties per listing in time buckets (from the ledger)."""

    groups = {}
    read = staticmethod(selectors.earnings_buckets)

    @extend_schema(
        operation_id="catalog_earnings", parameters=_WINDOW_PARAMS[:-3], responses={200: dict}
    )
    def get(self, request: Request) -> Response:
        return super().get(request)


def _money(value: Any) -> str:
    return f"{value:.2f}"


def line_out(line: Line | Any) -> dict[str, Any]:
    return {
        "object": "invoice.line",
        "kind": line.kind,
        "description": line.description,
        "meter": line.meter or None,
        "model": line.model or None,
        "quantity": line.quantity,
        "unit_price": None if line.unit_price is None else str(line.unit_price.normalize()),
        "per_units": line.per_units,
        "amount": _money(line.amount),
    }


def invoice_out(invoice: Invoice, *, lines: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": invoice.pk,
        "object": "invoice",
        "period_start": unix(invoice.period_start),
        "period_end": unix(invoice.period_end),
        "currency": invoice.currency,
        "subtotal": _money(invoice.subtotal),
        "credits_applied": _money(invoice.credits_applied),
        "total": _money(invoice.total),
        "status": invoice.status,
        "created_at": unix(invoice.created_at),
    }
    if lines:
        out["lines"] = [line_out(line) for line in invoice.lines.all()]
    return out


class InvoiceListApi(OrganizationApi):
    scopes = {"read": "billing.read"}

    @extend_schema(
        operation_id="list_invoices",
        parameters=[OpenApiParameter("after", str), OpenApiParameter("limit", int)],
        responses={200: dict},
    )
    def get(self, request: Request) -> Response:
        rows, has_more = paginate(Invoice.objects.for_organization(self.organization), request)
        return list_response(rows, has_more, invoice_out)


class InvoiceDetailApi(OrganizationApi):
    scopes = {"read": "billing.read"}

    @extend_schema(operation_id="retrieve_invoice", responses={200: dict})
    def get(self, request: Request, invoice_id: str) -> Response:
        invoice = self.get_owned(Invoice, invoice_id, label="invoice")
        return Response(invoice_out(invoice, lines=True))


class InvoiceUpcomingApi(OrganizationApi):
    """The current month's invoice as it stands now; nothing is stored."""

    scopes = {"read": "billing.read"}

    @extend_schema(operation_id="upcoming_invoice", responses={200: dict})
    def get(self, request: Request) -> Response:
        preview = invoice_preview(organization=self.organization)
        return Response(
            {
                "id": None,
                "object": "invoice",
                "period_start": unix(preview.period_start),
                "period_end": unix(preview.period_end),
                "currency": "usd",
                "subtotal": _money(preview.subtotal),
                "credits_applied": _money(preview.credits_applied),
                "total": _money(preview.total),
                "status": "upcoming",
                "lines": [line_out(line) for line in preview.lines],
            }
        )
