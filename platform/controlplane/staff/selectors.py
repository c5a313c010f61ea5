"""The staff dashboard's numbers: each section one or a few aggregate queries, so the
page costs the same whatever the size of the tables."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from django.db.models import Avg, Count, Min, Q, Sum
from django.utils import timezone

from controlplane.billing.models import Invoice, InvoiceStatus
from controlplane.billing.rating import month_bounds, usage_lines_all
from controlplane.engagements.models import Milestone, MilestoneStatus
from controlplane.inference import request_errors
from controlplane.inference.models import UsageRecord, UsageStatus
from controlplane.jobs.models import Job, JobKind, JobStatus
from controlplane.jobs.selectors import QUEUE_OF_KIND
from controlplane.tenancy.models import Organization

#: Rows the failed-jobs section lists (the count covers them all).
FAILED_SHOWN = 50
#: Organizations the revenue section names.
TOP_ORGANIZATIONS = 5


@dataclass(frozen=True)
class QueueRow:
    queue: str
    running: int = 0
    #: Queued in the database, waiting for the organization's concurrency slot.
    waiting: int = 0
    #: Queued and sent to the broker (an attempt no worker has started yet).
    sent: int = 0
    paused: int = 0
    oldest_queued_at: datetime | None = None

    @property
    def queued(self) -> int:
        return self.waiting + self.sent


def jobs_by_queue() -> list[QueueRow]:
    """Running, queued (waiting / sent to the broker) and paused jobs of each GPU queue."""
    rows = (
        Job.objects.dangerously_unscoped()
        .filter(status__in=(JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.PAUSED))
        .values("kind")
        .annotate(
            running=Count("id", filter=Q(status=JobStatus.RUNNING)),
            waiting=Count("id", filter=Q(status=JobStatus.QUEUED, dispatched_at__isnull=True)),
            sent=Count("id", filter=Q(status=JobStatus.QUEUED, dispatched_at__isnull=False)),
            paused=Count("id", filter=Q(status=JobStatus.PAUSED)),
            oldest=Min("queued_at", filter=Q(status=JobStatus.QUEUED)),
        )
    )
    # Kinds that share a queue (fine-tuning and evaluation jobs both run on gpu.training)
    # are one row: the queue is what an operator watches.
    by_queue: dict[str, dict[str, Any]] = {
        queue: {"running": 0, "waiting": 0, "sent": 0, "paused": 0, "oldest": None}
        for queue in QUEUE_OF_KIND.values()
    }
    for row in rows:
        total = by_queue[QUEUE_OF_KIND[JobKind(row["kind"])]]
        for name in ("running", "waiting", "sent", "paused"):
            total[name] += row[name]
        if row["oldest"] is not None and (
            total["oldest"] is None or row["oldest"] < total["oldest"]
        ):
            total["oldest"] = row["oldest"]
    out = [
        QueueRow(
            queue=queue,
            running=total["running"],
            waiting=total["waiting"],
            sent=total["sent"],
            paused=total["paused"],
            oldest_queued_at=total["oldest"],
        )
        for queue, total in by_queue.items()
    ]
    return out


@dataclass(frozen=True)
class FailedJobs:
    count: int
    jobs: list[Job]


def failed_jobs(*, now: datetime, hours: int = 24) -> FailedJobs:
    """Jobs that failed in the last `hours`, newest first."""
    recent = Job.objects.dangerously_unscoped().filter(
        status=JobStatus.FAILED, finished_at__gte=now - timedelta(hours=hours)
    )
    shown = list(
        recent.select_related("organization").order_by("-finished_at", "-id")[:FAILED_SHOWN]
    )
    count = len(shown) if len(shown) < FAILED_SHOWN else recent.count()
    return FailedJobs(count=count, jobs=shown)


@dataclass(frozen=True)
class InferenceHour:
    #: Requests a worker ran (their usage records), by how they ended.
    ran: int
    completed: int
    failed: int
    cancelled: int
    tokens: int
    mean_latency_ms: float | None
    #: Requests answered with an HTTP error at the front door, by status.
    errors_by_status: dict[int, int]
    top_models: list[dict[str, Any]] = field(default_factory=list)

    @property
    def refused(self) -> int:
        return sum(self.errors_by_status.values())

    @property
    def requests(self) -> int:
        return self.ran + self.refused

    @property
    def errors(self) -> int:
        """Failed while running, or answered with an error (4xx and 5xx alike)."""
        return self.failed + self.refused


def inference_last_hour(*, now: datetime) -> InferenceHour:
    """Inference of the last hour: usage records (requests that ran) in one aggregate,
    the five busiest models in another, and the front door's error counts from Redis."""
    records = UsageRecord.objects.dangerously_unscoped().filter(
        created_at__gte=now - timedelta(hours=1), created_at__lte=now
    )
    totals = records.aggregate(
        ran=Count("id"),
        completed=Count("id", filter=Q(status=UsageStatus.COMPLETED)),
        failed=Count("id", filter=Q(status=UsageStatus.FAILED)),
        cancelled=Count("id", filter=Q(status=UsageStatus.CANCELLED)),
        prompt=Sum("prompt_tokens"),
        completion=Sum("completion_tokens"),
        latency=Avg("latency_ms"),
    )
    top = list(
        records.values("model")
        .annotate(requests=Count("id"), failed=Count("id", filter=Q(status=UsageStatus.FAILED)))
        .order_by("-requests", "model")[:5]
    )
    return InferenceHour(
        ran=totals["ran"],
        completed=totals["completed"],
        failed=totals["failed"],
        cancelled=totals["cancelled"],
        tokens=int(totals["prompt"] or 0) + int(totals["completion"] or 0),
        mean_latency_ms=totals["latency"],
        errors_by_status=request_errors.errors_since(minutes=60, now=now.timestamp()),
        top_models=[dict(row) for row in top],
    )


@dataclass(frozen=True)
class Revenue:
    start: datetime
    end: datetime
    #: Usage of the month so far, rated with the price book (before plan allowances and
    #: credits, which apply when the month is invoiced).
    usage: Decimal
    by_meter: dict[str, Decimal]
    top_organizations: list[tuple[Organization | str, Decimal]]
    paid_invoices: int
    paid_amount: Decimal
    open_invoices: int
    open_amount: Decimal
    #: Engagement milestones billed this month (invoiced in Stripe on their own).
    milestones_billed: int = 0
    milestones_amount: Decimal = Decimal("0.00")


def revenue_month_to_date(*, now: datetime) -> Revenue:
    """The month so far: the ledger rated as invoicing rates it (one query; engagement
    work is not self-serve usage and is left out), the invoices issued this month (last
    month's bills), paid and open, and the engagement milestones billed this month."""
    start, _ = month_bounds(now.date())
    by_org: dict[str, Decimal] = defaultdict(Decimal)
    by_meter: dict[str, Decimal] = defaultdict(Decimal)
    for org_id, lines in usage_lines_all(start=start, end=now).items():
        for line in lines:
            by_org[org_id] += line.amount
            by_meter[line.meter] += line.amount
    top = sorted(by_org.items(), key=lambda item: (-item[1], item[0]))[:TOP_ORGANIZATIONS]
    names = Organization.objects.in_bulk([org_id for org_id, _ in top])
    invoices = (
        Invoice.objects.dangerously_unscoped()
        .filter(created_at__gte=start)
        .aggregate(
            paid=Count("id", filter=Q(status=InvoiceStatus.PAID)),
            paid_amount=Sum("total", filter=Q(status=InvoiceStatus.PAID)),
            open=Count("id", filter=Q(status=InvoiceStatus.OPEN)),
            open_amount=Sum("total", filter=Q(status=InvoiceStatus.OPEN)),
        )
    )
    milestones = (
        Milestone.objects.dangerously_unscoped()
        .filter(status=MilestoneStatus.BILLED, billed_at__gte=start, billed_at__lte=now)
        .aggregate(count=Count("id"), amount=Sum("amount"))
    )
    return Revenue(
        start=start,
        end=now,
        usage=sum(by_org.values(), Decimal("0.00")),
        by_meter=dict(sorted(by_meter.items())),
        top_organizations=[(names.get(org_id, org_id), amount) for org_id, amount in top],
        paid_invoices=invoices["paid"],
        paid_amount=invoices["paid_amount"] or Decimal("0.00"),
        open_invoices=invoices["open"],
        open_amount=invoices["open_amount"] or Decimal("0.00"),
        milestones_billed=milestones["count"],
        milestones_amount=milestones["amount"] or Decimal("0.00"),
    )


def dashboard(*, now: datetime | None = None) -> dict[str, Any]:
    now = now or timezone.now()
    return {
        "now": now,
        "queues": jobs_by_queue(),
        "failed": failed_jobs(now=now),
        "inference": inference_last_hour(now=now),
        "revenue": revenue_month_to_date(now=now),
    }
