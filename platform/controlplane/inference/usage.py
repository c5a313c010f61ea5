"""Usage of inference requests: stored exactly once per request, read per organization.

Every request a worker ran (completed, cancelled or failed part-way) produces
one `UsageReport` on the control queue. The broker delivers at least once (late
acks, redelivery after a lost worker), so the report's `request_id` is unique in
the table: a second delivery, even concurrent with the first, stores nothing.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any

import structlog
from django.db import IntegrityError, transaction
from django.db.models import QuerySet
from django.utils import timezone

from controlplane.tenancy.models import Organization
from jobcontracts.inference import KINDS, UsageReport

from .models import UsageRecord, UsageStatus

log = structlog.get_logger(__name__)

APPLIED = "applied"
DUPLICATE = "duplicate"
DROPPED = "dropped"
INVALID = "invalid"


def _when(at: float) -> datetime:
    if not math.isfinite(at) or at <= 0:
        return timezone.now()
    return datetime.fromtimestamp(at, tz=UTC)


def _parse(payload: dict[str, Any]) -> UsageReport:
    report = UsageReport.from_json(payload)
    if report.kind not in KINDS:
        raise ValueError(f"unknown kind {report.kind!r}")
    if report.status not in UsageStatus.values:
        raise ValueError(f"unknown status {report.status!r}")
    for name in ("prompt_tokens", "completion_tokens"):
        value = getattr(report, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, not {value!r}")
    for name in ("latency_ms", "at"):
        value = getattr(report, name)
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise ValueError(f"{name} must be a number, not {value!r}")
    for name, longest in (("request_id", 200), ("organization_id", 40), ("model", 300)):
        value = getattr(report, name)
        if not isinstance(value, str) or not 0 < len(value) <= longest:
            raise ValueError(f"{name} must be a string of 1 to {longest} characters")
    if report.api_key_id is not None and (
        not isinstance(report.api_key_id, str) or len(report.api_key_id) > 40
    ):
        raise ValueError("api_key_id must be a string of at most 40 characters")
    return report


def usage_record(payload: dict[str, Any]) -> str:
    """Store one worker's usage report. Returns what happened (for logs and tests):
    `applied`, `duplicate` (this request's usage is already stored), `dropped`
    (unknown organization) or `invalid` (not a usage report)."""
    try:
        report = _parse(payload)
    except (TypeError, ValueError, KeyError) as exc:
        log.error("inference.usage_report_invalid", error=str(exc), payload=payload)
        return INVALID
    bound = log.bind(request_id=report.request_id, organization_id=report.organization_id)
    if UsageRecord.objects.dangerously_unscoped().filter(request_id=report.request_id).exists():
        bound.info("inference.usage_duplicate")
        return DUPLICATE
    if not Organization.objects.filter(pk=report.organization_id).exists():
        bound.warning("inference.usage_for_unknown_organization")
        return DROPPED
    try:
        # Its own transaction: the organization's foreign key is checked at commit
        # (deferred), so an organization deleted meanwhile lands here too.
        with transaction.atomic():
            record = UsageRecord.objects.create(
                organization_id=report.organization_id,
                request_id=report.request_id,
                api_key_id=report.api_key_id or None,
                model=report.model,
                kind=report.kind,
                prompt_tokens=report.prompt_tokens,
                completion_tokens=report.completion_tokens,
                status=report.status,
                latency_ms=float(report.latency_ms),
                created_at=_when(float(report.at)),
            )
    except IntegrityError:
        if UsageRecord.objects.dangerously_unscoped().filter(request_id=report.request_id).exists():
            bound.info("inference.usage_duplicate")
            return DUPLICATE
        bound.warning("inference.usage_for_unknown_organization")
        return DROPPED
    bound.info(
        "inference.usage_recorded",
        usage_id=record.pk,
        model=record.model,
        prompt_tokens=record.prompt_tokens,
        completion_tokens=record.completion_tokens,
        status=record.status,
    )
    return APPLIED


def usage_for_organization(
    organization: Organization | str,
    *,
    start: datetime | None,
    end: datetime | None,
    model: str | None = None,
    api_key_id: str | None = None,
) -> QuerySet[UsageRecord]:
    """The organization's usage records with `start <= created_at < end` (either bound
    may be None: open), optionally for one model or one API key."""
    queryset = UsageRecord.objects.for_organization(organization)
    if start is not None:
        queryset = queryset.filter(created_at__gte=start)
    if end is not None:
        queryset = queryset.filter(created_at__lt=end)
    if model is not None:
        queryset = queryset.filter(model=model)
    if api_key_id is not None:
        queryset = queryset.filter(api_key_id=api_key_id)
    return queryset
