"""Dunning, and the per-request question "may this organization run inference?".

`invoice.payment_failed` opens a `Dunning` row with a grace period
(PAYMENTS_DUNNING_GRACE_DAYS); once it passes with the invoice still unpaid,
`ainference_refusal()` answers a 402 `billing_suspended` error naming the invoice
and where to pay it. `invoice.paid` resolves the row and service resumes.

Staff suspend an organization by hand (the admin's "suspend") with a dunning row of their
own (`STAFF_SUSPENSION_PREFIX`, no Stripe invoice behind it) whose grace period is over
at once, and restore service by resolving the open rows (`organization_suspend`,
`organization_restore`): one mechanism, one cache, one check on the request path.

`ainference_refusal()` runs on every inference request, so it never calls
Stripe and rarely the database: each process caches, per organization, the
earliest open grace deadline for PAYMENTS_STANDING_CACHE_SECONDS. The cached
value is a deadline, not a verdict, so the moment the grace period ends is
exact even from cache; a payment recorded in another process is seen within the
cache lifetime (in this process, at once: writes clear the entry on commit).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

import structlog
from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import transaction
from django.utils import timezone

from controlplane.core.errors import ApiError
from controlplane.core.ttlcache import TTLCache
from controlplane.tenancy.models import Organization

from .models import Dunning

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class _Standing:
    """The earliest open dunning of an organization (None: nothing unpaid)."""

    suspend_at: datetime | None
    stripe_invoice_id: str = ""
    hosted_invoice_url: str = ""
    amount_due: int = 0
    currency: str = ""


_cache: TTLCache[str, _Standing] = TTLCache(lambda: settings.PAYMENTS_STANDING_CACHE_SECONDS)


def standing_cache_clear(organization_id: str | None = None) -> None:
    if organization_id is None:
        _cache.clear()
    else:
        _cache.pop(organization_id)


def _load(organization_id: str) -> _Standing:
    row = (
        Dunning.objects.for_organization(organization_id)
        .filter(resolved_at__isnull=True)
        .order_by("grace_ends_at")
        .values_list(
            "grace_ends_at", "stripe_invoice_id", "hosted_invoice_url", "amount_due", "currency"
        )
        .first()
    )
    return _Standing(*row) if row else _Standing(None)


#: The `stripe_invoice_id` of a dunning row staff opened to suspend an organization by hand.
STAFF_SUSPENSION_PREFIX = "staff-suspension:"


def _verdict(standing: _Standing, now: datetime | None) -> ApiError | None:
    if standing.suspend_at is None or (now or timezone.now()) < standing.suspend_at:
        return None
    if standing.stripe_invoice_id.startswith(STAFF_SUSPENSION_PREFIX):
        return ApiError(
            f"Inference is suspended for this organization by Atelier staff since "
            f"{standing.suspend_at:%Y-%m-%d %H:%M} UTC. Contact support to have it restored.",
            status_code=403,
            code="organization_suspended",
        )
    amount = (
        f" ({standing.amount_due / 100:.2f} {standing.currency.upper()})"
        if standing.amount_due
        else ""
    )
    where = (
        f" Pay it at {standing.hosted_invoice_url}"
        if standing.hosted_invoice_url
        else " Pay it, or update the payment method, in the billing portal"
    )
    return ApiError(
        f"Inference is suspended: invoice {standing.stripe_invoice_id}{amount} is unpaid and its "
        f"grace period ended on {standing.suspend_at:%Y-%m-%d %H:%M} UTC.{where}; service "
        "resumes as soon as the payment goes through.",
        status_code=402,
        code="billing_suspended",
    )


async def ainference_refusal(
    organization_id: str, *, now: datetime | None = None
) -> ApiError | None:
    """The error to answer an inference request with, or None to let it run.

    Contract for the request path: pass the authenticated organization's id;
    raise (or render) the returned ApiError (HTTP 402, type `billing_error`,
    code `billing_suspended`) before doing any work. Costs a dict lookup on a
    cache hit and one indexed query per organization per
    PAYMENTS_STANDING_CACHE_SECONDS per process otherwise (in the process's database
    thread). Async only: its one caller is the serving path. `now` is for tests.
    """
    standing = _cache.get(organization_id)
    if standing is None:
        standing = _cache.put(organization_id, await sync_to_async(_load)(organization_id))
    return _verdict(standing, now)


def _clear_on_commit(organization_id: str) -> None:
    transaction.on_commit(lambda: standing_cache_clear(organization_id))


def dunning_start(*, organization: Organization, invoice: dict[str, object], at: datetime) -> str:
    """Open dunning for a Stripe invoice whose payment failed (call inside the event's transaction).

    The grace period runs from the first failure; later failures of the same
    invoice (Stripe's retries) do not extend it. An invoice already paid (its
    `paid` event arrived first) does not open dunning.
    """
    invoice_id = str(invoice["id"])
    existing = Dunning.objects.for_organization(organization).filter(stripe_invoice_id=invoice_id)
    if existing.exists():
        return "already_open" if existing.filter(resolved_at__isnull=True).exists() else "paid"
    Dunning.objects.create(
        organization=organization,
        stripe_invoice_id=invoice_id,
        hosted_invoice_url=str(invoice.get("hosted_invoice_url") or ""),
        amount_due=int(str(invoice.get("amount_due") or 0)),
        currency=str(invoice.get("currency") or ""),
        started_at=at,
        grace_ends_at=at + timedelta(days=settings.PAYMENTS_DUNNING_GRACE_DAYS),
    )
    _clear_on_commit(organization.pk)
    log.info("payments.dunning_started", organization_id=organization.pk, invoice=invoice_id)
    return "dunning_started"


def dunning_resolve(*, organization: Organization, invoice: dict[str, object], at: datetime) -> str:
    """The Stripe invoice is paid: close its dunning (or record it paid, if it never failed)."""
    invoice_id = str(invoice["id"])
    updated = (
        Dunning.objects.for_organization(organization)
        .filter(stripe_invoice_id=invoice_id, resolved_at__isnull=True)
        .update(resolved_at=at)
    )
    if (
        not updated
        and not Dunning.objects.for_organization(organization)
        .filter(stripe_invoice_id=invoice_id)
        .exists()
    ):
        # A tombstone: a `payment_failed` delivered after this must not start dunning.
        Dunning.objects.create(
            organization=organization,
            stripe_invoice_id=invoice_id,
            amount_due=0,
            currency=str(invoice.get("currency") or ""),
            started_at=at,
            grace_ends_at=at,
            resolved_at=at,
        )
    _clear_on_commit(organization.pk)
    if updated:
        log.info("payments.dunning_resolved", organization_id=organization.pk, invoice=invoice_id)
        return "service_restored"
    return "paid"


@transaction.atomic
def organization_suspend(*, organization: Organization, at: datetime | None = None) -> str | None:
    """Staff suspend inference now. Returns the suspension's id, or None when the
    organization is already suspended by staff (nothing is added)."""
    when = at or timezone.now()
    Organization.objects.select_for_update().get(pk=organization.pk)  # one suspension at a time
    open_rows = Dunning.objects.for_organization(organization).filter(resolved_at__isnull=True)
    if open_rows.filter(stripe_invoice_id__startswith=STAFF_SUSPENSION_PREFIX).exists():
        return None
    suspension = f"{STAFF_SUSPENSION_PREFIX}{organization.pk}:{int(when.timestamp() * 1000)}"
    Dunning.objects.create(
        organization=organization,
        stripe_invoice_id=suspension,
        started_at=when,
        grace_ends_at=when,
    )
    _clear_on_commit(organization.pk)
    log.info("payments.organization_suspended", organization_id=organization.pk)
    return suspension


@transaction.atomic
def organization_restore(*, organization: Organization, at: datetime | None = None) -> list[str]:
    """Staff restore service: every open dunning of the organization is resolved, a staff
    suspension or an unpaid invoice's (staff waive it; a later failure of that same
    invoice does not reopen it). Returns what was resolved (invoice or suspension ids)."""
    open_rows = Dunning.objects.for_organization(organization).filter(resolved_at__isnull=True)
    resolved = list(open_rows.order_by("started_at").values_list("stripe_invoice_id", flat=True))
    if resolved:
        open_rows.update(resolved_at=at or timezone.now())
        _clear_on_commit(organization.pk)
        log.info("payments.organization_restored", organization_id=organization.pk)
    return resolved
