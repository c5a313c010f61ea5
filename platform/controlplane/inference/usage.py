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

from controlplane.billing.ledger import inference_usage_many_to_ledger, inference_usage_to_ledger
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


def _row(report: UsageReport) -> UsageRecord:
    return UsageRecord(
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
            record = _row(report)
            record.save(force_insert=True)
            # Billed once with the record: same transaction, request id as the key.
            inference_usage_to_ledger(record)
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


def usage_record_many(payloads: list[dict[str, Any]]) -> dict[str, int]:
    """Store a batch of usage reports (the usage stream's consumer): one query for the
    request ids already stored, one INSERT … ON CONFLICT DO NOTHING for the rest.

    Safe to run again on the same batch, or concurrently with another consumer (the
    unique request id decides). Returns how many were applied, duplicate, dropped
    and invalid."""
    counts = {APPLIED: 0, DUPLICATE: 0, DROPPED: 0, INVALID: 0}
    reports: dict[str, UsageReport] = {}
    payloads_by_id: dict[str, dict[str, Any]] = {}
    for payload in payloads:
        try:
            report = _parse(payload)
        except (TypeError, ValueError, KeyError) as exc:
            log.error("inference.usage_report_invalid", error=str(exc), payload=payload)
            counts[INVALID] += 1
            continue
        if report.request_id in reports:
            counts[DUPLICATE] += 1
        reports[report.request_id] = report
        payloads_by_id[report.request_id] = payload
    if not reports:
        return counts
    stored = set(
        UsageRecord.objects.dangerously_unscoped()
        .filter(request_id__in=list(reports))
        .values_list("request_id", flat=True)
    )
    counts[DUPLICATE] += len(stored)
    fresh = [r for r in reports.values() if r.request_id not in stored]
    known = set(
        Organization.objects.filter(pk__in={r.organization_id for r in fresh}).values_list(
            "pk", flat=True
        )
    )
    counts[DROPPED] += sum(1 for r in fresh if r.organization_id not in known)
    rows = [_row(r) for r in fresh if r.organization_id in known]
    try:
        with transaction.atomic():
            UsageRecord.objects.dangerously_unscoped().bulk_create(rows, ignore_conflicts=True)
            # Billed with the records, same transaction; request ids key the entries.
            inference_usage_many_to_ledger(rows)
    except IntegrityError:
        # An organization deleted meanwhile (its key is checked at commit): one by one.
        for row in rows:
            counts[usage_record(payloads_by_id[row.request_id])] += 1
        return counts
    counts[APPLIED] += len(rows)
    if rows:
        log.info("inference.usage_batch_recorded", records=len(rows), **counts)
    return counts


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
