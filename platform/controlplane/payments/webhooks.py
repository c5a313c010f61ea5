"""Stripe webhook events: verified, then applied exactly once.

Each event is handled in one transaction that also inserts its `StripeEvent`
row (keyed by Stripe's event id): a replay or a concurrent duplicate delivery
finds the row (or blocks on its insert, then finds it) and changes nothing.

Failures are answered so that Stripe's retries help. Stripe retries every
delivery not answered 2xx (4xx included) for days, so:
- a transient failure (the database or Stripe's API unreachable) rolls back
  both and is raised: the view answers 5xx and Stripe's retry applies the event;
- a permanent one (the event's content fails our validation: an ApiError below
  500, a missing or malformed field) would fail the same way on every retry, so
  its effects are rolled back, the event is recorded with outcome `failed` and
  the reason (admin, Stripe events), and the view answers 200; a redelivery is
  then a duplicate.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any

import orjson
import structlog
from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction

from controlplane.billing.credits import credit_grant
from controlplane.billing.invoicing import invoice_status_advance
from controlplane.billing.models import CreditSource, Invoice, InvoiceStatus
from controlplane.core import metrics
from controlplane.core.errors import ApiError
from controlplane.tenancy.models import Organization

from . import access, services
from .models import StripeCustomer, StripeEvent
from .signals import stripe_invoice_settled

log = structlog.get_logger(__name__)


class BadEvent(ValueError):
    """The body is signed but is not a Stripe event we can read."""


def _organization_for(obj: dict[str, Any]) -> Organization | None:
    """The organization a Stripe object belongs to: by its customer, else by our metadata."""
    customer = obj.get("customer")
    if isinstance(customer, dict):
        customer = customer.get("id")
    if customer:
        org_id = (
            StripeCustomer.objects.dangerously_unscoped()
            .filter(stripe_id=customer)
            .values_list("organization_id", flat=True)
            .first()
        )
        if org_id:
            return Organization.objects.get(pk=org_id)
    org_id = (obj.get("metadata") or {}).get("organization_id")
    if org_id:
        return Organization.objects.filter(pk=org_id).first()
    return None


def _subscription(org: Organization, obj: dict[str, Any], event: dict[str, Any]) -> str:
    # The event only says which subscription changed: its state is read from Stripe
    # (services.subscription_sync says why), so events of one second apply in any order.
    return services.subscription_sync(
        organization=org,
        subscription_id=str(obj["id"]),
        at=int(event["created"]),
        source=f"webhook:{event['id']}",
    )


def _when(event: dict[str, Any]) -> datetime:
    return datetime.fromtimestamp(int(event["created"]), tz=UTC)


def _ledger_invoice_paid(org: Organization, obj: dict[str, Any]) -> None:
    ledger_id = (obj.get("metadata") or {}).get("atelier_invoice_id") or ""
    invoices = Invoice.objects.for_organization(org)
    if not invoices.filter(pk=ledger_id).exists():
        ledger_id = (
            invoices.filter(stripe_invoice_id=obj["id"]).values_list("pk", flat=True).first()
        )
    if ledger_id:
        invoice_status_advance(organization=org, invoice_id=ledger_id, status=InvoiceStatus.PAID)


def _invoice_paid(org: Organization, obj: dict[str, Any], event: dict[str, Any]) -> str:
    _ledger_invoice_paid(org, obj)
    stripe_invoice_settled.send(sender=None, organization=org, invoice=obj, status="paid")
    return access.dunning_resolve(organization=org, invoice=obj, at=_when(event))


def _invoice_payment_failed(org: Organization, obj: dict[str, Any], event: dict[str, Any]) -> str:
    stripe_invoice_settled.send(sender=None, organization=org, invoice=obj, status="payment_failed")
    return access.dunning_start(organization=org, invoice=obj, at=_when(event))


def _credit_purchase(org: Organization, obj: dict[str, Any], event: dict[str, Any]) -> str:
    """A paid credit purchase (PaymentIntent or Checkout Session with our metadata)."""
    metadata = obj.get("metadata") or {}
    if metadata.get("atelier_purpose") != "credits":
        return "ignored_not_credits"
    if obj.get("object") == "checkout.session" and obj.get("payment_status") != "paid":
        return "ignored_unpaid"
    try:
        amount = Decimal(str(metadata["credit_amount"]))
    except (KeyError, InvalidOperation):
        return "ignored_no_amount"
    # The payment intent, not the event: a purchase seen through both a checkout
    # session and its payment intent is granted once.
    purchase = obj.get("payment_intent") if obj.get("object") == "checkout.session" else obj["id"]
    credit_grant(
        organization=org,
        amount=amount,
        source=CreditSource.PURCHASE,
        idempotency_key=f"stripe:{purchase}",
        note=f"Stripe {obj.get('object')} {obj['id']}",
    )
    return "credits_granted"


Handler = Callable[[Organization, dict[str, Any], dict[str, Any]], str]

HANDLERS: dict[str, Handler] = {
    "customer.subscription.created": _subscription,
    "customer.subscription.updated": _subscription,
    "customer.subscription.deleted": _subscription,
    "invoice.paid": _invoice_paid,
    # Older API versions (and localstripe) send this instead of invoice.paid.
    "invoice.payment_succeeded": _invoice_paid,
    "invoice.payment_failed": _invoice_payment_failed,
    "payment_intent.succeeded": _credit_purchase,
    "checkout.session.completed": _credit_purchase,
}


def parse(payload: bytes) -> dict[str, Any]:
    try:
        event = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise BadEvent("the body is not JSON") from exc
    if not isinstance(event, dict) or event.get("object", "event") != "event":
        raise BadEvent("the body is not a Stripe event object")
    ok = (
        isinstance(event.get("id"), str)
        and event["id"]
        and isinstance(event.get("type"), str)
        and isinstance(event.get("created"), int)
        and isinstance((event.get("data") or {}).get("object"), dict)
    )
    if not ok:
        raise BadEvent("the event lacks id, type, created or data.object")
    return event


def _permanent(exc: Exception) -> bool:
    """Whether `exc` would recur on every retry of the same event (see the module docstring)."""
    if isinstance(exc, ApiError):
        return exc.status_code < 500  # 5xx: billing off, Stripe unreachable, retry later
    return isinstance(exc, KeyError | TypeError | ValueError | ValidationError)


def _reason(exc: Exception) -> str:
    detail = exc.detail if isinstance(exc, ApiError) else exc
    return f"{type(exc).__name__}: {detail}"[:2000]


def event_process(event: dict[str, Any]) -> tuple[str, bool]:
    """Apply one verified event once. Returns (outcome, whether this call applied it).

    Outcome `failed` (not applied, recorded with the reason) for a permanent
    failure; a transient one is raised, with nothing recorded. Each call is counted in
    `atelier_webhook_events_total` (a handler's own outcome counts as `processed`).
    """
    kind = event["type"] if event["type"] in HANDLERS else "other"
    try:
        outcome, applied = _event_process(event)
    except Exception:
        metrics.WEBHOOK_EVENTS.labels(type=kind, outcome="retry").inc()
        raise
    counted = outcome if outcome in metrics.WEBHOOK_OUTCOMES else "processed"
    metrics.WEBHOOK_EVENTS.labels(type=kind, outcome=counted).inc()
    return outcome, applied


def _event_process(event: dict[str, Any]) -> tuple[str, bool]:
    if StripeEvent.objects.filter(pk=event["id"]).exists():
        return "duplicate", False
    obj = event["data"]["object"]
    handler = HANDLERS.get(event["type"])
    org = _organization_for(obj) if handler else None
    try:
        with transaction.atomic():
            # Inserted first, in the same transaction as the effect: a concurrent duplicate
            # blocks on this primary key until the first commits, then fails and rolls back.
            record = _record(event, org, "processing")
            if handler is None:
                outcome = "ignored_type"
            elif org is None:
                outcome = "ignored_unknown_customer"
            else:
                outcome = handler(org, obj, event)
            record.outcome = outcome
            record.save(update_fields=["outcome"])
    except IntegrityError:
        if StripeEvent.objects.filter(pk=event["id"]).exists():
            return "duplicate", False
        raise
    except Exception as exc:
        if not _permanent(exc):
            raise
        return _failed(event, org, exc), False
    log.info(
        "payments.webhook_processed",
        event_id=event["id"],
        event_type=event["type"],
        organization_id=org.pk if org else None,
        outcome=outcome,
    )
    return outcome, True


def _record(
    event: dict[str, Any], org: Organization | None, outcome: str, *, failure: str = ""
) -> StripeEvent:
    """The event's row, keyed by Stripe's event id: a second insert of one id fails."""
    return StripeEvent.objects.create(
        id=event["id"],
        type=event["type"],
        created=event["created"],
        organization=org,
        outcome=outcome,
        failure=failure,
        payload=event,
    )


def _failed(event: dict[str, Any], org: Organization | None, exc: Exception) -> str:
    """Record a permanently failing event (its effects were rolled back): never run again."""
    reason = _reason(exc)
    try:
        with transaction.atomic():
            _record(event, org, "failed", failure=reason)
    except IntegrityError:
        if StripeEvent.objects.filter(pk=event["id"]).exists():
            return "duplicate"  # a concurrent delivery recorded it first
        raise
    log.warning(
        "payments.webhook_failed",
        event_id=event["id"],
        event_type=event["type"],
        organization_id=org.pk if org else None,
        error=reason,
    )
    return "failed"
