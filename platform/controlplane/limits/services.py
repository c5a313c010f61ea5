"""Writes: per-key limits, budgets, and the alerts a budget sends."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import structlog
from django.core.mail import send_mail
from django.db import IntegrityError, transaction
from django.utils import timezone

from controlplane.accounts.models import APIKey
from controlplane.accounts.services import api_key_manage_check
from controlplane.audit.services import Actor, audit_record
from controlplane.tenancy.models import Membership, Organization
from controlplane.tenancy.roles import Role

from .budgets import BudgetSpec
from .models import Budget, BudgetAlert, BudgetPeriod, KeyLimits

if TYPE_CHECKING:
    from controlplane.accounts.authentication import Principal

log = structlog.get_logger(__name__)

LIMIT_FIELDS = ("requests_per_minute", "tokens_per_minute", "requests_per_day")
SYSTEM = Actor(type="system")


@transaction.atomic
def key_limits_set(
    *,
    api_key: APIKey,
    values: dict[str, int | None],
    actor: Actor,
    principal: Principal | None,
) -> KeyLimits:
    """Set a key's own rate limits (None: back to the plan's). Audited; caches drop at once here.

    Only for a key whose member the caller may manage (`principal` None: staff or the
    system): an admin throttling the owner's key to one request a day locks the owner out.
    """
    api_key_manage_check(principal=principal, api_key=api_key, action="change the limits of")
    row, _ = KeyLimits.objects.for_organization(api_key.organization_id).get_or_create(
        organization_id=api_key.organization_id, api_key=api_key
    )
    before = {f: getattr(row, f) for f in LIMIT_FIELDS}
    for name in LIMIT_FIELDS:
        if name in values:
            setattr(row, name, values[name])
    row.save()
    audit_record(
        organization=api_key.organization_id,
        actor=actor,
        action="api_key.limits_updated",
        target=api_key,
        details={"before": before, "after": {f: getattr(row, f) for f in LIMIT_FIELDS}},
    )
    return row


def _budget_details(budget: Budget) -> dict[str, Any]:
    return {
        "name": budget.name,
        "api_key_id": budget.api_key_id,
        "amount": str(budget.amount),
        "kind": budget.kind,
        "period": budget.period,
        "period_days": budget.period_days,
        "alert_thresholds": budget.alert_thresholds,
    }


@transaction.atomic
def budget_create(
    *,
    organization: Organization,
    api_key: APIKey | None,
    name: str,
    amount: Decimal,
    kind: str,
    period: str,
    period_days: int | None,
    anchor: datetime | None,
    alert_thresholds: list[int],
    actor: Actor,
) -> Budget:
    """A new budget. Enforcement starts within LIMITS_CACHE_SECONDS in every process
    (at once in this one), counting spend already in the ledger for the current period."""
    budget = Budget.objects.create(
        organization=organization,
        api_key=api_key,
        name=name,
        amount=amount,
        kind=kind,
        period=period,
        period_days=period_days if period == BudgetPeriod.DAYS else None,
        anchor=anchor or timezone.now(),
        alert_thresholds=sorted(set(alert_thresholds)),
    )
    audit_record(
        organization=organization,
        actor=actor,
        action="budget.created",
        target=budget,
        target_type="budget",
        details=_budget_details(budget),
    )
    return budget


@transaction.atomic
def budget_update(*, budget: Budget, changes: dict[str, Any], actor: Actor) -> Budget:
    """Change a budget's amount, kind, name or thresholds; the period's spend carries over."""
    budget = Budget.objects.locked(budget)
    for name, value in changes.items():
        setattr(budget, name, sorted(set(value)) if name == "alert_thresholds" else value)
    budget.save()
    audit_record(
        organization=budget.organization_id,
        actor=actor,
        action="budget.updated",
        target=budget,
        target_type="budget",
        details=_budget_details(budget),
    )
    return budget


@transaction.atomic
def budget_delete(*, budget: Budget, actor: Actor) -> None:
    audit_record(
        organization=budget.organization_id,
        actor=actor,
        action="budget.deleted",
        target=budget,
        target_type="budget",
        details=_budget_details(budget),
    )
    budget.delete()


def _recipients(organization_id: str) -> list[str]:
    return sorted(
        Membership.objects.for_organization(organization_id)
        .filter(role__in=[Role.OWNER, Role.BILLING], user__is_active=True)
        .values_list("user__email", flat=True)
    )


def budget_alert_record(
    *,
    budget: BudgetSpec,
    period_start: datetime,
    period_end: datetime,
    threshold: int,
    spent: Decimal,
) -> BudgetAlert | None:
    """Record that `budget` passed `threshold`% in a period, once: audit event and email.

    Why a database row: Redis remembers the alert too, but Redis can be lost;
    the unique (budget, period, threshold) row makes the alert and its email
    happen once per period whatever races or rebuilds occur. Returns None when
    it was already recorded (or the budget was deleted meanwhile).
    """
    row = Budget.objects.for_organization(budget.organization_id).filter(pk=budget.id).first()
    if row is None:
        return None
    try:
        with transaction.atomic():
            alert = BudgetAlert.objects.create(
                organization_id=budget.organization_id,
                budget_id=budget.id,
                period_start=period_start,
                threshold=threshold,
                spent=spent,
            )
            audit_record(
                organization=budget.organization_id,
                actor=SYSTEM,
                action="budget.threshold_crossed",
                target=row,
                target_type="budget",
                details={
                    "alert_id": alert.pk,
                    "threshold": threshold,
                    "spent": str(spent),
                    "amount": str(budget.amount),
                    "period_start": period_start.isoformat(),
                },
            )
    except IntegrityError:
        return None
    log.info(
        "limits.budget_alert",
        organization_id=budget.organization_id,
        budget_id=budget.id,
        threshold=threshold,
    )
    recipients = _recipients(budget.organization_id)
    if recipients:
        what = (
            "requests will be refused once it is spent"
            if budget.kind == "hard"
            else "this is a soft budget: requests are not refused"
        )
        send_mail(
            subject=f"Atelier budget alert: {threshold}% of {budget.name or budget.id} used",
            message=(
                f"{budget.title} has reached {threshold}% of its amount: ${spent} spent "
                f"this period (since {period_start:%Y-%m-%d %H:%M} UTC).\n"
                f"The period ends at {period_end:%Y-%m-%d %H:%M} UTC; {what}."
            ),
            from_email=None,
            recipient_list=recipients,
            fail_silently=True,
        )
    return alert
