"""Plans are rows (controlplane.billing.Plan): tests set a plan's limits here."""

from __future__ import annotations

from typing import Any

from controlplane.billing.models import Plan
from controlplane.billing.plans import default_plan, plan_cache_clear


def set_plan(code: str, **fields: Any) -> Plan:
    """Give plan `code` these values (creating it from the built-in defaults if missing)."""
    plan = Plan.objects.filter(code=code).first() or default_plan(code)
    for name, value in fields.items():
        setattr(plan, name, value)
    plan.save()
    plan_cache_clear()
    return plan
