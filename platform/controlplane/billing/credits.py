"""Prepaid credits: granted by staff or bought through Stripe, drawn down by invoices.

Balance = sum of grants - sum of `credits_applied` on stored invoices. An
invoice records what it drew, in the same transaction that stores it, so a
credit is applied exactly once however often the invoice run is repeated.
"""

from __future__ import annotations

from decimal import Decimal

import structlog
from django.db import IntegrityError, transaction
from django.db.models import Sum

from controlplane.core.errors import ApiError
from controlplane.tenancy.models import Organization

from .models import CreditGrant, CreditSource, Invoice

log = structlog.get_logger(__name__)


def credit_grant(
    *,
    organization: Organization | str,
    amount: Decimal,
    source: str,
    idempotency_key: str,
    note: str = "",
    granted_by_id: str | None = None,
) -> CreditGrant:
    """Add prepaid credit (USD) to an organization, once per `idempotency_key`.

    Payments calls this when a credit purchase succeeds (key: the Stripe payment
    intent or event id); staff grants come through the admin. A second call
    with the same key returns the first grant and adds nothing. Raises ApiError
    (400) for a non-positive amount or an unknown source.
    """
    org_id = organization.pk if isinstance(organization, Organization) else organization
    amount = Decimal(amount)
    if not amount.is_finite() or amount <= 0:
        raise ApiError("A credit amount must be positive.", param="amount", code="invalid_value")
    if amount != amount.quantize(Decimal("0.01")):
        raise ApiError(
            "A credit amount has at most 2 decimals.", param="amount", code="invalid_value"
        )
    if source not in CreditSource.values:
        raise ApiError(
            f"Unknown credit source '{source}': use one of {', '.join(CreditSource.values)}.",
            param="source",
            code="invalid_value",
        )
    existing = CreditGrant.objects.dangerously_unscoped().filter(idempotency_key=idempotency_key)
    found = existing.first()
    if found is not None:
        return found
    try:
        with transaction.atomic():
            grant = CreditGrant.objects.create(
                organization_id=org_id,
                amount=amount,
                source=source,
                idempotency_key=idempotency_key,
                note=note,
                granted_by_id=granted_by_id,
            )
    except IntegrityError:
        found = existing.first()
        if found is None:
            raise
        return found
    log.info("billing.credit_granted", organization_id=org_id, amount=str(amount), source=source)
    return grant


def credit_balance(organization: Organization | str) -> Decimal:
    """Credit left: grants minus what stored invoices have drawn (USD, 2 decimals)."""
    granted = CreditGrant.objects.for_organization(organization).aggregate(s=Sum("amount"))["s"]
    applied = Invoice.objects.for_organization(organization).aggregate(s=Sum("credits_applied"))[
        "s"
    ]
    return (granted or Decimal(0)) - (applied or Decimal(0))
