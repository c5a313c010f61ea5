"""OpenAI-style lists: `{object: "list", data, first_id, last_id, has_more}`.

Cursor pagination with `after` (an id) and `limit`. Ids are time-ordered (see
ids.py), so `id` is the only sort key needed, newest first.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from django.db.models import Model, QuerySet
from rest_framework.request import Request
from rest_framework.response import Response

from .errors import ApiError

M = TypeVar("M", bound=Model)

DEFAULT_LIMIT = 20
MAX_LIMIT = 100


def parse_limit(request: Request, *, default: int = DEFAULT_LIMIT, maximum: int = MAX_LIMIT) -> int:
    raw = request.query_params.get("limit")
    if raw is None:
        return default
    try:
        limit = int(raw)
    except ValueError:
        raise ApiError("'limit' must be an integer.", param="limit", code="invalid_value") from None
    if not 1 <= limit <= maximum:
        raise ApiError(
            f"'limit' must be between 1 and {maximum}.", param="limit", code="invalid_value"
        )
    return limit


def paginate(queryset: QuerySet[M], request: Request) -> tuple[list[M], bool]:
    """The page after the `after` cursor, newest first, and whether more remain."""
    limit = parse_limit(request)
    queryset = queryset.order_by("-pk")
    after = request.query_params.get("after")
    if after:
        queryset = queryset.filter(pk__lt=after)
    rows = list(queryset[: limit + 1])
    return rows[:limit], len(rows) > limit


def list_response(
    rows: Sequence[M], has_more: bool, serialize: Callable[[M], dict[str, Any]]
) -> Response:
    data = [serialize(row) for row in rows]
    return Response(
        {
            "object": "list",
            "data": data,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
            "has_more": has_more,
        }
    )
