"""Plans as data: which plan an organization is on, read often, cached briefly.

`plan_for()` is called on hot paths (inference limits, job dispatch): it keeps
each Plan row in a process-local cache for `BILLING_PLAN_CACHE_SECONDS` (an
admin edit reaches every process within that time; a save in this process
clears it at once). The organization's current plan code is `Organization.plan`;
`PlanAssignment` rows keep the history that proration needs.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any

import structlog
from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import transaction
from django.db.models.signals import post_delete, post_save
from django.dispatch import receiver
from django.utils import timezone

from controlplane.core.errors import ApiError
from controlplane.core.ttlcache import TTLCache
from controlplane.tenancy.models import Organization

from .models import Plan, PlanAssignment, PlanBilledBy

log = structlog.get_logger(__name__)

#: The plan an organization whose code names no Plan row falls back to.
FALLBACK_PLAN = "free"

#: The plans a fresh installation starts with (the data migration seeds the same
#: values); used as-is where the table lacks a row, e.g. a test database emptied
#: between tests. Concurrency comes from settings.PLANS.
DEFAULT_PLANS: dict[str, dict[str, Any]] = {
    "free": {
        "name": "Free",
        "monthly_price": Decimal("0.00"),
        "included_amount": Decimal("1.00"),
        "requests_per_minute": 20,
        "tokens_per_minute": 40_000,
        "requests_per_day": 1_000,
        "max_tokens_cap": 2_048,
        "max_n": 4,
    },
    "pro": {
        "name": "Pro",
        "monthly_price": Decimal("29.00"),
        "included_amount": Decimal("10.00"),
        "requests_per_minute": 600,
        "tokens_per_minute": 1_000_000,
        "requests_per_day": None,
        "max_tokens_cap": 8_192,
        "max_n": 16,
    },
    "enterprise": {
        "name": "Enterprise",
        "monthly_price": Decimal("500.00"),
        "included_amount": Decimal("200.00"),
        "requests_per_minute": 6_000,
        "tokens_per_minute": 10_000_000,
        "requests_per_day": None,
        "max_tokens_cap": None,
        "max_n": 128,
    },
}


def default_plan(code: str) -> Plan:
    """The built-in plan `code` (unsaved), with settings.PLANS' concurrency."""
    values = DEFAULT_PLANS[code]
    concurrency = (getattr(settings, "PLANS", {}).get(code) or {}).get(
        "concurrent_fine_tuning_jobs", {"free": 1, "pro": 4}.get(code, 16)
    )
    return Plan(code=code, concurrent_fine_tuning_jobs=int(concurrency), **values)


def plans_ensure_defaults() -> None:
    """Create any built-in plan the table lacks (never changes an existing row)."""
    for code in DEFAULT_PLANS:
        if not Plan.objects.filter(code=code).exists():
            default_plan(code).save(force_insert=True)


_cache: TTLCache[str, Plan] = TTLCache(
    lambda: float(getattr(settings, "BILLING_PLAN_CACHE_SECONDS", 30.0))
)


def plan_cache_clear() -> None:
    _cache.clear()


@receiver(post_save, sender=Plan)
@receiver(post_delete, sender=Plan)
def _plan_changed(**kwargs: Any) -> None:
    plan_cache_clear()


def _plan_by_code(code: str) -> Plan:
    hit = _cache.get(code)
    if hit is not None:
        return hit
    plan = Plan.objects.filter(code=code).first()
    if plan is None and code in DEFAULT_PLANS:
        plan = default_plan(code)
    if plan is None:
        plan = Plan.objects.filter(code=FALLBACK_PLAN).first() or default_plan(FALLBACK_PLAN)
    return _cache.put(code, plan)


def plan_for(organization: Organization | str) -> Plan:
    """The Plan an organization is on now (unknown codes fall back to `free`).

    Given an Organization, costs no query while its plan is cached; given an id,
    one query for the organization's plan code. Synchronous: from asyncio call
    `aplan_for`.
    """
    if isinstance(organization, Organization):
        code = organization.plan
    else:
        code = (
            Organization.objects.filter(pk=organization).values_list("plan", flat=True).first()
            or FALLBACK_PLAN
        )
    return _plan_by_code(code)


async def aplan_for(organization: Organization | str) -> Plan:
    """`plan_for` for an asyncio request handler (the cache hit costs no thread hop's query)."""
    if isinstance(organization, Organization):
        hit = _cache.get(organization.plan)
        if hit is not None:
            return hit
    return await sync_to_async(plan_for)(organization)


@transaction.atomic
def plan_change(
    *,
    organization: Organization,
    plan_code: str,
    at: datetime | None = None,
    billed_by: str = PlanBilledBy.INVOICE,
) -> PlanAssignment:
    """Move an organization to another plan from `at` (default now).

    Keeps the history (a PlanAssignment row) that invoicing prorates on, and sets
    Organization.plan. Payments calls this when a subscription starts, changes or
    ends, with `billed_by="subscription"` while a Stripe subscription charges the
    plan's fee (the monthly invoice then does not charge it again); staff
    assignments keep the default, `invoice`. A call that changes neither the plan
    nor who bills it records nothing and returns the assignment in force.
    Raises ApiError 400 (param `plan`) for an unknown or inactive plan.
    """
    plans_ensure_defaults()
    plan = Plan.objects.filter(code=plan_code, active=True).first()
    if plan is None:
        raise ApiError(
            f"No active plan '{plan_code}'. Choose one of: "
            + ", ".join(Plan.objects.filter(active=True).values_list("code", flat=True))
            + ".",
            param="plan",
            code="invalid_plan",
        )
    if billed_by not in PlanBilledBy.values:
        raise ValueError(f"billed_by must be one of {PlanBilledBy.values}, not {billed_by!r}")
    when = at or timezone.now()
    org = Organization.objects.select_for_update().get(pk=organization.pk)
    history = PlanAssignment.objects.for_organization(org).order_by("effective_from", "created_at")
    latest = history.last()
    if latest is None:
        # The plan it was on until now, from its creation: proration needs the start.
        latest = PlanAssignment.objects.create(
            organization=org, plan_id=_plan_by_code(org.plan).code, effective_from=org.created_at
        )
    if latest.plan_id == plan.code and latest.billed_by == billed_by and org.plan == plan.code:
        return latest
    assignment = PlanAssignment.objects.create(
        organization=org, plan=plan, effective_from=when, billed_by=billed_by
    )
    org.plan = plan.code
    org.save(update_fields=["plan", "updated_at"])
    organization.plan = plan.code
    log.info(
        "billing.plan_changed",
        organization_id=org.pk,
        plan=plan.code,
        billed_by=billed_by,
        at=when.isoformat(),
    )
    return assignment
