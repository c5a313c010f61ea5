"""A monthly budget for a person's organization (or one of its keys), made through the service."""

from __future__ import annotations

from decimal import Decimal

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
