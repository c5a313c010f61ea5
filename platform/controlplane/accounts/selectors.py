"""Reads for API keys."""

from __future__ import annotations

from django.db.models import Q, QuerySet
from django.utils import timezone

from controlplane.core.errors import ApiError

from .models import APIKey

STATUSES = ("active", "rotating", "expired", "revoked")


def api_keys_with_status(queryset: QuerySet[APIKey], status: str) -> QuerySet[APIKey]:
    """Filter by the same status `APIKey.status` reports (an expired rotated key is `expired`)."""
    now = timezone.now()
    live = Q(revoked_at__isnull=True) & (Q(expires_at__isnull=True) | Q(expires_at__gt=now))
    conditions = {
        "active": live & Q(rotated_at__isnull=True),
        "rotating": live & Q(rotated_at__isnull=False),
        "expired": Q(revoked_at__isnull=True, expires_at__lte=now),
        "revoked": Q(revoked_at__isnull=False),
    }
    if status not in conditions:
        raise ApiError(f"'status' must be one of {', '.join(STATUSES)}.", param="status")
    return queryset.filter(conditions[status])
