"""Payments writes: subscriptions (start, change, cancel, apply Stripe's state) and invoice push.

Stripe is the source of truth. A subscription change is applied locally as soon
as Stripe's API confirms it, and again when the webhook for it arrives; both go
through `subscription_sync`, which reads the subscription from Stripe while the
local row is locked and stores what it read, so the order in which API calls
and events arrive (or the second they were stamped with) does not matter.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import structlog
from django.conf import settings
from django.db import transaction

from controlplane.billing.invoicing import invoice_status_advance
from controlplane.billing.models import Invoice, InvoiceStatus, Plan, PlanBilledBy
from controlplane.billing.plans import FALLBACK_PLAN, plan_change
from controlplane.core.errors import ApiError, Conflict
from controlplane.tenancy.models import Organization

from . import gateway
from .models import TERMINAL_STATUSES, StripeInvoice, Subscription, SubscriptionStatus

log = structlog.get_logger(__name__)

#: Statuses in which the organization is on the subscribed plan.
PLAN_GRANTING = frozenset(
    {SubscriptionStatus.ACTIVE, SubscriptionStatus.TRIALING, SubscriptionStatus.PAST_DUE}
)
#: Statuses in which a subscription exists and can be changed or cancelled.
LIVE = frozenset(
    {
        SubscriptionStatus.INCOMPLETE,
        SubscriptionStatus.TRIALING,
        SubscriptionStatus.ACTIVE,
        SubscriptionStatus.PAST_DUE,
        SubscriptionStatus.UNPAID,
        SubscriptionStatus.PAUSED,
    }
)


def _ts(value: Any) -> datetime | None:
    return datetime.fromtimestamp(int(value), tz=UTC) if value else None


def _first_item(obj: dict[str, Any]) -> dict[str, Any]:
    items = (obj.get("items") or {}).get("data") or []
    return dict(items[0]) if items else {}


def _plan_code_of(obj: dict[str, Any]) -> str:
    """Our plan code for a Stripe subscription: its metadata, else the plan/price id's owner."""
    code = (obj.get("metadata") or {}).get("plan")
    item = _first_item(obj)
    stripe_plan = (item.get("plan") or item.get("price") or obj.get("plan") or {}).get("id", "")
    if stripe_plan:
        owner = Plan.objects.filter(stripe_price_id=stripe_plan).values_list("code", flat=True)
        code = owner.first() or code
    return str(code or "")


def subscription_get(organization: Organization) -> Subscription:
    """The organization's subscription row (an unsaved `none` one if it never subscribed)."""
    row = Subscription.objects.for_organization(organization).first()
    return row or Subscription(organization=organization, plan="", status=SubscriptionStatus.NONE)


def _locked_row(organization: Organization) -> Subscription:
    row = Subscription.objects.for_organization(organization).select_for_update().first()
    if row is None:
        Organization.objects.select_for_update().filter(pk=organization.pk).first()
        row = Subscription.objects.for_organization(organization).select_for_update().first()
        if row is None:
            row = Subscription.objects.create(organization=organization)
    return row


@transaction.atomic
def subscription_sync(
    *, organization: Organization, subscription_id: str, at: int, source: str
) -> str:
    """Store Stripe's current state of subscription `subscription_id`; `at` (Unix seconds)
    is when the change that prompted this happened (an event's `created`, an API call's time).

    Why a re-read instead of the copy in the event: Stripe does not deliver events
    in order, stamps them to the second only, and gives subscriptions no version,
    so two events of one second cannot be ordered from their payloads (a sequence
    of our own would only record the order they arrived in, the order that is
    wrong). Stripe's API, read while this organization's subscription row is
    locked, is ordered: whichever sync commits last read Stripe last, so it stores
    the newest state, and an old event only makes us store the current one again.

    Returns what happened ("applied", "unchanged", "other_subscription", "stale"),
    for the webhook's record. A cancelled subscription never comes back to life,
    and an event about a subscription the organization has since replaced is
    ignored. When the plan in force changes, the ledger's `plan_change` records it
    (Organization.plan and the PlanAssignment history that invoices prorate on),
    marked as billed by the subscription: the Stripe subscription is the one
    owner of the plan fee, and the monthly ledger invoice shows those plan days
    at 0. A subscription that ends returns the organization to the free plan,
    billed by invoice. Blocking (a Stripe round trip, with the row locked).
    Raises gateway.StripeObjectMissing if Stripe has no such subscription and
    PaymentProviderError if Stripe cannot be reached (the lock is released).
    """
    row = _locked_row(organization)
    obj = gateway.subscription_retrieve(subscription_id)
    sub_id = str(obj.get("id", ""))
    status = str(obj.get("status", ""))
    if row.stripe_subscription_id and row.stripe_subscription_id != sub_id:
        replacing = row.status in TERMINAL_STATUSES or row.status == SubscriptionStatus.NONE
        if not replacing or status in TERMINAL_STATUSES:
            return "other_subscription"
    revived = row.status in TERMINAL_STATUSES and status not in TERMINAL_STATUSES
    if row.stripe_subscription_id == sub_id and revived:
        return "stale"  # Stripe never revives one; kept so a bad read cannot either
    item = _first_item(obj)
    before = _state(row)
    row.stripe_subscription_id = sub_id
    row.status = status if status in SubscriptionStatus.values else SubscriptionStatus.UNPAID
    row.plan = _plan_code_of(obj) or row.plan
    row.current_period_end = _ts(obj.get("current_period_end") or item.get("current_period_end"))
    row.cancel_at_period_end = bool(obj.get("cancel_at_period_end"))
    row.state_at = max(row.state_at, at)
    row.save()
    in_force = row.plan if row.status in PLAN_GRANTING else None
    billed_by = PlanBilledBy.SUBSCRIPTION
    if row.status in TERMINAL_STATUSES:
        in_force, billed_by = FALLBACK_PLAN, PlanBilledBy.INVOICE
    if in_force:
        # A no-op unless the plan, or who bills it, changes. While the subscription grants
        # the plan, Stripe charges its fee, so the monthly invoice must not charge it too.
        plan_change(organization=organization, plan_code=in_force, at=_ts(at), billed_by=billed_by)
    changed = _state(row) != before
    log.info(
        "payments.subscription_synced",
        organization_id=organization.pk,
        subscription=sub_id,
        status=row.status,
        plan=row.plan,
        changed=changed,
        source=source,
    )
    return "applied" if changed else "unchanged"


def _state(row: Subscription) -> tuple[Any, ...]:
    return (
        row.stripe_subscription_id,
        row.status,
        row.plan,
        row.current_period_end,
        row.cancel_at_period_end,
    )


def _paid_plan(code: str) -> Plan:
    plan = Plan.objects.filter(code=code, active=True).first()
    if plan is None:
        choices = Plan.objects.filter(active=True, monthly_price__gt=0).values_list(
            "code", flat=True
        )
        raise ApiError(
            f"No plan '{code}'. Choose one of: {', '.join(choices)}.",
            param="plan",
            code="invalid_plan",
        )
    if plan.monthly_price <= 0:
        raise ApiError(
            f"Plan '{code}' is free and needs no subscription. To return to it, cancel the "
            "subscription (POST /v1/organization/subscription/cancel).",
            param="plan",
            code="invalid_plan",
        )
    return plan


def subscription_set_plan(
    *, organization: Organization, plan_code: str, payment_method: str | None = None
) -> Subscription:
    """Start a subscription to `plan_code`, or move the live one to it (Stripe prorates).

    Blocking (Stripe round trips): call from a request handler's thread or a task.
    The new state is read back from Stripe and stored at once, and again, harmlessly,
    when its webhook arrives.
    """
    plan = _paid_plan(plan_code)
    gateway.client()  # refuse early, with billing_disabled, when Stripe is off
    stripe_plan = gateway.plan_sync(plan)
    if payment_method:
        gateway.payment_method_attach(organization=organization, payment_method=payment_method)
    row = subscription_get(organization)
    now = int(time.time())
    if row.status in LIVE and row.stripe_subscription_id:
        if row.plan == plan.code and not row.cancel_at_period_end:
            raise Conflict(
                f"The organization is already subscribed to '{plan.code}'. "
                "Name another plan to change it.",
                param="plan",
                code="already_subscribed",
            )
        current = gateway.subscription_retrieve(row.stripe_subscription_id)
        obj = gateway.subscription_update_plan(
            subscription_id=row.stripe_subscription_id,
            item_id=_first_item(current)["id"],
            plan_id=stripe_plan,
            plan_code=plan.code,
            key=f"atelier-subscription-change-{row.pk}-{row.state_at}-{stripe_plan}",
        )
        if obj.get("cancel_at_period_end"):  # changing plan withdraws a pending cancellation
            obj = gateway.subscription_cancel_at_period_end(
                row.stripe_subscription_id, cancel=False
            )
    else:
        obj = gateway.subscription_create(
            customer=gateway.customer_for(organization),
            plan_id=stripe_plan,
            organization_id=organization.pk,
            plan_code=plan.code,
            key=f"atelier-subscription-start-{organization.pk}-{row.state_at}-{stripe_plan}",
        )
    # Stored as Stripe has it now, like a webhook's: a reply applied as-is could land after
    # (and undo) a newer state that an event's sync stored meanwhile.
    subscription_sync(organization=organization, subscription_id=obj["id"], at=now, source="api")
    return subscription_get(organization)


def subscription_cancel(*, organization: Organization, at_period_end: bool = True) -> Subscription:
    """Cancel the live subscription: at the end of the paid period (default) or now.

    At period end, the organization keeps its plan until Stripe ends the
    subscription (`customer.subscription.deleted` then moves it to the free plan).
    """
    row = subscription_get(organization)
    if row.status not in LIVE or not row.stripe_subscription_id:
        raise Conflict("The organization has no subscription to cancel.", code="no_subscription")
    now = int(time.time())
    if at_period_end:
        obj = gateway.subscription_cancel_at_period_end(row.stripe_subscription_id, cancel=True)
    else:
        obj = gateway.subscription_cancel_now(row.stripe_subscription_id)
    subscription_sync(organization=organization, subscription_id=obj["id"], at=now, source="api")
    return subscription_get(organization)


# --- invoices ----------------------------------------------------------------------


#: Stripe's invoice status -> the ledger invoice's (a Stripe draft leaves ours draft: retried).
_LEDGER_STATUS = {
    "open": InvoiceStatus.OPEN,
    "uncollectible": InvoiceStatus.OPEN,
    "paid": InvoiceStatus.PAID,
    "void": InvoiceStatus.VOID,
}


def invoice_push(*, organization: Organization, invoice: Invoice) -> str | None:
    """Put the ledger's `invoice` on Stripe: one invoice item per line, then finalize and collect.

    Idempotent: running it twice creates nothing new. The ledger invoice's row in
    `StripeInvoice` is locked for the push, so two concurrent pushes serialise;
    each line's invoice item carries the line id in its metadata and an
    idempotency key derived from it, and existing items and invoices are looked
    up by that metadata before anything is created, so a push that died half-way
    resumes where it stopped. Returns the Stripe invoice id, or None for an
    invoice with nothing to charge. Blocking: call from the invoice-run task.
    """
    if invoice.organization_id != organization.pk:
        raise ValueError("invoice belongs to another organization")
    lines = [line for line in invoice.lines.all() if gateway.cents(line.amount) != 0]
    if not lines:
        return None
    customer = gateway.customer_for(organization)
    with transaction.atomic():
        record, _ = StripeInvoice.objects.for_organization(organization).get_or_create(
            organization=organization, invoice_id=invoice.pk
        )
        record = StripeInvoice.objects.locked(record)
        stripe_id = record.stripe_invoice_id
        if not stripe_id:
            found = [
                inv
                for inv in gateway.invoices_of(customer)
                if (inv.get("metadata") or {}).get("atelier_invoice_id") == invoice.pk
            ]
            stripe_id = found[0]["id"] if found else ""
        if not stripe_id:
            pending = {
                (item.get("metadata") or {}).get("atelier_invoice_line_id")
                for item in gateway.pending_items_of(customer)
            }
            for line in lines:
                if line.pk in pending:
                    continue
                gateway.invoice_item_create(
                    customer=customer,
                    amount_cents=gateway.cents(line.amount),
                    currency=invoice.currency,
                    description=line.description,
                    metadata={"atelier_invoice_line_id": line.pk, "atelier_invoice_id": invoice.pk},
                )
            created = gateway.invoice_create(
                customer=customer, invoice_id=invoice.pk, organization_id=organization.pk
            )
            stripe_id = created["id"]
        record.stripe_invoice_id = stripe_id
        record.save(update_fields=["stripe_invoice_id", "updated_at"])
    # Outside the lock's transaction: the Stripe invoice id is committed even if collecting fails.
    current = gateway.invoice_retrieve(stripe_id)
    if current.get("status") == "draft":
        try:
            current = gateway.invoice_pay(stripe_id)
        except ApiError as exc:  # declined or no payment method: the invoice stays open or draft
            log.info("payments.invoice_collect_failed", invoice=invoice.pk, error=str(exc.detail))
            current = gateway.invoice_retrieve(stripe_id)
    status = str(current.get("status", ""))
    with transaction.atomic():
        StripeInvoice.objects.for_organization(organization).filter(pk=record.pk).update(
            status=status
        )
        # Forward only: a `paid` stored meanwhile by the invoice.paid webhook stays paid.
        invoice_status_advance(
            organization=organization,
            invoice_id=invoice.pk,
            status=_LEDGER_STATUS.get(status, InvoiceStatus.DRAFT),
            stripe_invoice_id=stripe_id,
            pushed=True,
        )
    log.info(
        "payments.invoice_pushed",
        organization_id=organization.pk,
        invoice=invoice.pk,
        stripe_invoice=stripe_id,
        status=status,
    )
    return stripe_id


# --- prepaid credits ----------------------------------------------------------------


def credit_purchase_start(
    *, organization: Organization, amount: Decimal, request_key: str
) -> dict[str, Any]:
    """Start buying `amount` USD of prepaid credit: a Stripe PaymentIntent for the customer.

    Nothing is granted here: the caller confirms the intent with its `client_secret`
    (Stripe.js), and the `payment_intent.succeeded` webhook grants the credit once
    per intent (webhooks._credit_purchase). `request_key` (the client's
    Idempotency-Key, else a fresh one) makes a retried request return the same
    intent in real Stripe. Blocking (Stripe round trips).
    """
    low, high = settings.PAYMENTS_CREDIT_PURCHASE_MIN, settings.PAYMENTS_CREDIT_PURCHASE_MAX
    if not low <= amount <= high:
        raise ApiError(
            f"A credit purchase is between {low} and {high} {settings.STRIPE_CURRENCY.upper()}; "
            f"{amount} is not.",
            param="amount",
            code="invalid_value",
        )
    intent = gateway.credit_payment_intent(
        organization=organization,
        amount=amount,
        key=f"atelier-credits-{organization.pk}-{request_key}",
    )
    log.info(
        "payments.credit_purchase_started",
        organization_id=organization.pk,
        payment_intent=intent["id"],
        amount=str(amount),
    )
    return intent
