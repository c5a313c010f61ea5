"""Usage of inference requests: stored exactly once per request, read per organization.

Every request a worker ran (completed, cancelled or failed part-way) produces
one `UsageReport` on the control queue. The broker delivers at least once (late
acks, redelivery after a lost worker), so the report's `request_id` is unique in
the table: a second delivery, even concurrent with the first, stores nothing.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog
from django.db import DataError, IntegrityError, transaction
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

#: Why a report is refused: the label of the dead-letter metric, so a small, fixed set.
MALFORMED = "malformed"  # not JSON, not an object, fields missing, unknown or of a wrong type
TIMESTAMP_OUT_OF_RANGE = "timestamp_out_of_range"
TOKENS_OUT_OF_RANGE = "tokens_out_of_range"
INVALID_VALUE = "invalid_value"  # unknown kind or status, an id or name of a wrong shape
DATABASE_REJECTED = "database_rejected"  # valid, yet PostgreSQL refused its row
REJECTION_REASONS = (
    MALFORMED,
    TIMESTAMP_OUT_OF_RANGE,
    TOKENS_OUT_OF_RANGE,
    INVALID_VALUE,
    DATABASE_REJECTED,
)

#: Tokens one request may report, per count: far above any context window, far below
#: the integer column (2**31 - 1) and the ledger's bigint, so a sum never overflows.
MAX_TOKENS = 100_000_000
#: `at` is seconds since the epoch. The window is wide on purpose (a late report, or
#: one replayed from the dead letters after an outage, is still stored); it catches
#: unit mistakes (milliseconds are ~1000x too far ahead) and garbage, not clock skew.
OLDEST_REPORT = timedelta(days=3 * 366)
NEWEST_REPORT = timedelta(days=90)

_ORGANIZATION_ID = re.compile(r"org_[0-9a-z]{1,36}", re.ASCII)
_API_KEY_ID = re.compile(r"key_[0-9a-z]{1,36}", re.ASCII)
_REQUEST_ID = re.compile(r"[\w.:@/+-]{1,200}", re.ASCII)


class UsageReportInvalid(ValueError):
    """A payload that is not a usage report the ledger can store; `reason` is one of
    `REJECTION_REASONS`."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def _number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise UsageReportInvalid(MALFORMED, f"{name} must be a number, not {value!r}")
    if not math.isfinite(value):
        raise UsageReportInvalid(INVALID_VALUE, f"{name} must be finite, not {value!r}")
    return float(value)


def usage_report_parse(payload: object) -> UsageReport:
    """A usage report from a worker's JSON, checked field by field and range by range
    before anything is written, so one bad report cannot fail a batch of good ones.
    Raises `UsageReportInvalid` with the reason."""
    if not isinstance(payload, dict):
        raise UsageReportInvalid(MALFORMED, "a usage report must be a JSON object")
    try:
        report = UsageReport.from_json(payload)
    except TypeError as exc:  # a field missing, or one the contract does not have
        raise UsageReportInvalid(MALFORMED, str(exc)) from None
    for name, longest in (("request_id", 200), ("organization_id", 40), ("model", 300)):
        value = getattr(report, name)
        if not isinstance(value, str):
            raise UsageReportInvalid(MALFORMED, f"{name} must be a string, not {value!r}")
        if not 0 < len(value) <= longest or not value.isprintable():
            raise UsageReportInvalid(
                INVALID_VALUE, f"{name} must be 1 to {longest} printable characters"
            )
    if not _REQUEST_ID.fullmatch(report.request_id):
        raise UsageReportInvalid(INVALID_VALUE, f"request_id {report.request_id!r} is malformed")
    if not _ORGANIZATION_ID.fullmatch(report.organization_id):
        raise UsageReportInvalid(
            INVALID_VALUE, f"organization_id {report.organization_id!r} is not an organization id"
        )
    if report.api_key_id is not None:
        if not isinstance(report.api_key_id, str):
            raise UsageReportInvalid(MALFORMED, "api_key_id must be a string or null")
        if not _API_KEY_ID.fullmatch(report.api_key_id):
            raise UsageReportInvalid(
                INVALID_VALUE, f"api_key_id {report.api_key_id!r} is not an API key id"
            )
    if not isinstance(report.kind, str) or report.kind not in KINDS:
        raise UsageReportInvalid(INVALID_VALUE, f"unknown kind {report.kind!r}")
    if not isinstance(report.status, str) or report.status not in UsageStatus.values:
        raise UsageReportInvalid(INVALID_VALUE, f"unknown status {report.status!r}")
    for name in ("prompt_tokens", "completion_tokens"):
        value = getattr(report, name)
        if not isinstance(value, int) or isinstance(value, bool):
            raise UsageReportInvalid(MALFORMED, f"{name} must be an integer, not {value!r}")
        if not 0 <= value <= MAX_TOKENS:
            raise UsageReportInvalid(
                TOKENS_OUT_OF_RANGE, f"{name} must be between 0 and {MAX_TOKENS}, not {value}"
            )
    if _number("latency_ms", report.latency_ms) < 0:
        raise UsageReportInvalid(INVALID_VALUE, "latency_ms must not be negative")
    at = _number("at", report.at)
    now = timezone.now().timestamp()
    oldest, newest = now - OLDEST_REPORT.total_seconds(), now + NEWEST_REPORT.total_seconds()
    if not oldest <= at <= newest:
        raise UsageReportInvalid(
            TIMESTAMP_OUT_OF_RANGE,
            f"at must be seconds since the epoch between {oldest:.0f} and {newest:.0f}, "
            f"not {report.at!r}",
        )
    return report


def _row(report: UsageReport) -> UsageRecord:
    return UsageRecord(
        organization_id=report.organization_id,
        request_id=report.request_id,
        trace_id=report.trace_id[:200] if isinstance(report.trace_id, str) else "",
        api_key_id=report.api_key_id or None,
        model=report.model,
        kind=report.kind,
        prompt_tokens=report.prompt_tokens,
        completion_tokens=report.completion_tokens,
        status=report.status,
        latency_ms=float(report.latency_ms),
        created_at=datetime.fromtimestamp(float(report.at), tz=UTC),
    )


def _record_one(report: UsageReport) -> str:
    """Store one parsed report in its own transaction: `applied`, `duplicate` or
    `dropped`. A row the database refuses for another reason raises (IntegrityError,
    DataError), as does an unavailable database (OperationalError)."""
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
        if not Organization.objects.filter(pk=report.organization_id).exists():
            bound.warning("inference.usage_for_unknown_organization")
            return DROPPED
        raise  # neither: a constraint the report breaks, not to be passed off as dropped
    bound.info(
        "inference.usage_recorded",
        usage_id=record.pk,
        model=record.model,
        prompt_tokens=record.prompt_tokens,
        completion_tokens=record.completion_tokens,
        status=record.status,
    )
    return APPLIED


def usage_record(payload: dict[str, Any]) -> str:
    """Store one worker's usage report. Returns what happened (for logs and tests):
    `applied`, `duplicate` (this request's usage is already stored), `dropped`
    (unknown organization) or `invalid` (not a usage report)."""
    try:
        report = usage_report_parse(payload)
    except UsageReportInvalid as exc:
        log.error(
            "inference.usage_report_invalid", reason=exc.reason, error=str(exc), payload=payload
        )
        return INVALID
    return _record_one(report)


@dataclass
class UsageBatchResult:
    counts: dict[str, int] = field(
        default_factory=lambda: {APPLIED: 0, DUPLICATE: 0, DROPPED: 0, INVALID: 0}
    )
    #: Request id -> the database's error, for the rows it refused (counted invalid);
    #: every other report of the batch is stored.
    refused: dict[str, str] = field(default_factory=dict)


def usage_record_batch(reports: Sequence[UsageReport]) -> UsageBatchResult:
    """Store parsed usage reports (the usage stream's consumer): one query for the
    request ids already stored, one INSERT … ON CONFLICT DO NOTHING for the rest.

    Safe to run again on the same batch, or concurrently with another consumer (the
    unique request id decides). If the database refuses the batch because of a row
    (IntegrityError, DataError), the reports are stored one by one and only the rows
    it still refuses are left out, in `refused`. An unavailable database
    (OperationalError and the like) raises: nothing is stored, nothing refused."""
    result = UsageBatchResult()
    counts = result.counts
    unique: dict[str, UsageReport] = {}
    for report in reports:
        if report.request_id in unique:
            counts[DUPLICATE] += 1
        unique[report.request_id] = report
    if not unique:
        return result
    stored = set(
        UsageRecord.objects.dangerously_unscoped()
        .filter(request_id__in=list(unique))
        .values_list("request_id", flat=True)
    )
    counts[DUPLICATE] += len(stored)
    fresh = [r for r in unique.values() if r.request_id not in stored]
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
    except (IntegrityError, DataError) as exc:
        # An organization deleted meanwhile (its key is checked at commit), or a row
        # the database refuses: one by one, so one row cannot hold back the rest.
        log.warning("inference.usage_batch_refused", records=len(rows), error=str(exc))
        for row in rows:
            try:
                counts[_record_one(unique[row.request_id])] += 1
            except (IntegrityError, DataError) as row_exc:
                log.error(
                    "inference.usage_row_refused", request_id=row.request_id, error=str(row_exc)
                )
                result.refused[row.request_id] = str(row_exc)
                counts[INVALID] += 1
        return result
    counts[APPLIED] += len(rows)
    if rows:
        log.info("inference.usage_batch_recorded", records=len(rows), **counts)
    return result


def usage_record_many(payloads: list[dict[str, Any]]) -> dict[str, int]:
    """Parse and store a batch of usage reports (`usage_record_batch`); returns how
    many were applied, duplicate, dropped and invalid."""
    reports: list[UsageReport] = []
    invalid = 0
    for payload in payloads:
        try:
            reports.append(usage_report_parse(payload))
        except UsageReportInvalid as exc:
            log.error(
                "inference.usage_report_invalid", reason=exc.reason, error=str(exc), payload=payload
            )
            invalid += 1
    counts = usage_record_batch(reports).counts
    counts[INVALID] += invalid
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
