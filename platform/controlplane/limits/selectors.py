"""Reads for the limits endpoints."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from controlplane.accounts.models import APIKey
from controlplane.billing.plans import plan_for
from controlplane.core.serializers import unix

from .budgets import BudgetSpec, budget_state
from .models import Budget, KeyLimits
from .ratelimit import Decision, format_reset
from .resolve import limits_for
from .services import LIMIT_FIELDS

_CENT_FRACTION = Decimal("0.000001")


def key_limits_out(api_key: APIKey) -> dict[str, Any]:
    """A key's own overrides, and what applies (override, else the plan)."""
    row = (
        KeyLimits.objects.for_organization(api_key.organization_id).filter(api_key=api_key).first()
    )
    limits = limits_for(organization_id=api_key.organization_id, api_key_id=api_key.pk)
    return {
        "object": "organization.api_key.rate_limits",
        "api_key_id": api_key.pk,
        "plan": plan_for(api_key.organization_id).code,
        "overrides": {f: getattr(row, f) if row is not None else None for f in LIMIT_FIELDS},
        "effective": {f: getattr(limits, f"key_{f}") for f in LIMIT_FIELDS},
        "organization": {f: getattr(limits, f"organization_{f}") for f in LIMIT_FIELDS},
    }


def rate_limits_out(decision: Decision) -> dict[str, Any]:
    return {
        "object": "organization.rate_limits",
        "api_key_id": decision.api_key_id,
        "data": [
            {
                "scope": s.window.scope,
                "unit": s.window.unit,
                "per": {"min": "minute", "day": "day"}[s.window.span],
                "limit": s.window.limit,
                "remaining": s.remaining,
                "reset": format_reset(s.reset_seconds),
                "reset_seconds": round(s.reset_seconds, 3),
            }
            for s in decision.states
        ],
    }


def budget_out(budget: Budget) -> dict[str, Any]:
    state = budget_state(BudgetSpec.of(budget))
    return {
        "object": "organization.budget",
        "id": budget.pk,
        "name": budget.name,
        "api_key_id": budget.api_key_id,
        "amount": str(budget.amount.normalize()),
        "currency": "usd",
        "kind": budget.kind,
        "period": budget.period,
        "period_days": budget.period_days,
        "anchor": unix(budget.anchor),
        "alert_thresholds": budget.alert_thresholds,
        "current_period": {
            "start_time": unix(state.period_start),
            "end_time": unix(state.period_end),
            "spent": str(state.spent.quantize(_CENT_FRACTION)),
            "reserved": str(state.reserved.quantize(_CENT_FRACTION)),
        },
        "created_at": unix(budget.created_at),
        "updated_at": unix(budget.updated_at),
    }
