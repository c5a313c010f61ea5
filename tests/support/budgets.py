"""A monthly budget for a person's organization (or one of its keys), made through the
service; and the budgets' reserve and settle as a sync caller runs them."""

from __future__ import annotations

from decimal import Decimal

from asgiref.sync import async_to_sync

from controlplane.limits.budgets import areserve, asettle
from controlplane.limits.models import Budget
from controlplane.limits.services import budget_create

from .people import SYSTEM, Person


def monthly_budget(
    person: Person,
    amount: str,
    *,
    kind: str = "soft",
    name: str = "",
    key: str | None = None,
) -> Budget:
    return budget_create(
        organization=person.organization,
        api_key=person.membership.api_keys.get(pk=key) if key else None,
        name=name,
        amount=Decimal(amount),
        kind=kind,
        period="month",
        period_days=None,
        anchor=None,
        alert_thresholds=[],
        actor=SYSTEM,
    )


#: The async-only reserve and settle, blocking (`async_to_sync`: their database look-ups
#: run on this thread, in the test's transaction).
reserve = async_to_sync(areserve)
settle = async_to_sync(asettle)
