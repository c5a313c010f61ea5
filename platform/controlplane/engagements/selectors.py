"""Reads: an engagement's spend against its budget, its jobs and models.

Spend is what finished work cost: the engagement's ledger entries (the jobs' meters,
written with `engagement_id`), priced as every ledger read is (`billing.selectors.priced`:
the price in force when each event occurred), their training tokens, and the GPU-seconds
its jobs ran (start to finish, times their GPUs). Committed is what unfinished jobs were
estimated to use: a job counts once, as committed until it finishes, then as spent.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from django.db import models
from django.db.models import (
    DecimalField,
    ExpressionWrapper,
    F,
    OuterRef,
    Q,
    Subquery,
    Sum,
    Value,
)
from django.db.models.functions import Coalesce, Extract

from controlplane.billing.models import LedgerEntry, Meter
from controlplane.billing.selectors import priced
from controlplane.jobs.models import TERMINAL, Job, JobStatus
from controlplane.modelregistry.models import CustomerModel, ModelKind

from .estimates import NOTHING, Estimate, job_estimate
from .models import Engagement, Milestone, MilestoneStatus

_MONEY = DecimalField(max_digits=40, decimal_places=20)


def _ledger_of(engagement: Any) -> models.QuerySet[LedgerEntry]:
    return LedgerEntry.objects.dangerously_unscoped().filter(engagement_id=engagement)


def _sum_over(
    queryset: models.QuerySet[Any], expression: Any, output: models.Field[Any, Any]
) -> Any:
    """`expression` summed over `queryset` (rows of one engagement) as a correlated scalar
    subquery; 0 when there are none."""
    total = queryset.order_by().values("engagement_id").annotate(total=Sum(expression))
    return Coalesce(
        Subquery(total.values("total")[:1], output_field=output), Value(0), output_field=output
    )


def with_spend(queryset: models.QuerySet[Engagement]) -> models.QuerySet[Engagement]:
    """Engagements annotated with `spent_amount`, `spent_tokens`, `spent_gpu_seconds`, and
    the next unbilled milestone (`next_milestone_title`, `next_milestone_due`): one query
    for a whole admin page."""
    ledger = _ledger_of(OuterRef("pk"))
    ran = Job.objects.dangerously_unscoped().filter(
        engagement_id=OuterRef("pk"),
        status__in=TERMINAL,
        started_at__isnull=False,
        finished_at__isnull=False,
    )
    seconds = ExpressionWrapper(
        Extract(F("finished_at") - F("started_at"), "epoch") * F("gpus"), output_field=_MONEY
    )
    upcoming = (
        Milestone.objects.dangerously_unscoped()
        .filter(engagement=OuterRef("pk"))
        .exclude(status=MilestoneStatus.BILLED)
        .order_by(F("due_date").asc(nulls_last=True), "id")
    )
    return queryset.annotate(
        spent_amount=_sum_over(priced(ledger), F("cost"), _MONEY),
        spent_tokens=_sum_over(
            ledger.filter(meter=Meter.TRAINING_TOKENS), F("quantity"), models.BigIntegerField()
        ),
        spent_gpu_seconds=_sum_over(ran, seconds, _MONEY),
        next_milestone_title=Subquery(upcoming.values("title")[:1]),
        next_milestone_due=Subquery(upcoming.values("due_date")[:1]),
    )


@dataclass(frozen=True)
class Budget:
    """An engagement's budget, what finished work spent and what unfinished jobs commit."""

    limit: Estimate
    spent: Estimate
    committed: Estimate
    unfinished_jobs: int

    @property
    def used_percent(self) -> int:
        """The most used of the three budgets, spent only, in percent (rounded down)."""
        return used_percent(self.limit, self.spent)


def used_percent(limit: Estimate, spent: Estimate) -> int:
    shares = []
    for used, cap in (
        (spent.tokens, limit.tokens),
        (spent.gpu_seconds, limit.gpu_seconds),
        (spent.amount, limit.amount),
    ):
        if cap:
            shares.append(int(Decimal(used) * 100 / Decimal(cap)))
        elif used:
            shares.append(100)
    return max(shares, default=0)


def budget_limit(engagement: Engagement) -> Estimate:
    return Estimate(
        tokens=int(engagement.budget_tokens),
        gpu_seconds=int(engagement.budget_gpu_seconds),
        amount=Decimal(engagement.budget_amount),
    )


def spent_of(engagement: Engagement) -> Estimate:
    row = with_spend(Engagement.objects.for_organization(engagement.organization_id)).get(
        pk=engagement.pk
    )
    return Estimate(
        tokens=int(row.spent_tokens),  # type: ignore[attr-defined]
        gpu_seconds=int(row.spent_gpu_seconds),  # type: ignore[attr-defined]
        amount=Decimal(row.spent_amount),  # type: ignore[attr-defined]
    )


def engagement_budget(engagement: Engagement) -> Budget:
    unfinished = list(engagement_jobs(engagement).exclude(status__in=TERMINAL))
    committed = NOTHING
    for job in unfinished:
        committed = committed + job_estimate(job)
    return Budget(
        limit=budget_limit(engagement),
        spent=spent_of(engagement),
        committed=committed,
        unfinished_jobs=len(unfinished),
    )


def engagement_jobs(engagement: Engagement) -> models.QuerySet[Job]:
    return (
        Job.objects.for_organization(engagement.organization_id)
        .filter(engagement_id=engagement.pk)
        .select_related("base_model")
        .order_by("-created_at")
    )


def engagement_models(engagement: Engagement) -> models.QuerySet[CustomerModel]:
    """The models its jobs made (final and compressed; checkpoints are never delivered)."""
    return (
        CustomerModel.objects.for_organization(engagement.organization_id)
        .filter(
            engagement_id=engagement.pk,
            kind__in=[ModelKind.FINAL, ModelKind.COMPRESSED],
            deleted_at__isnull=True,
        )
        .order_by("-created_at", "-pk")
    )


def deliverable_models(engagement: Engagement) -> models.QuerySet[CustomerModel]:
    """Its models not delivered yet, made by a job of it that succeeded."""
    succeeded = Job.objects.for_organization(engagement.organization_id).filter(
        engagement_id=engagement.pk, status=JobStatus.SUCCEEDED
    )
    return engagement_models(engagement).filter(
        Q(delivered_at__isnull=True), job_id__in=succeeded.values("pk")
    )


def delivered_models(engagement: Engagement) -> models.QuerySet[CustomerModel]:
    return engagement_models(engagement).filter(delivered_at__isnull=False)
