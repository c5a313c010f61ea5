"""The one module that talks to Stripe (an import-linter contract keeps `stripe` out of the rest).

Everything here is blocking network I/O: call it from services, admin actions and
Celery tasks, never from the inference request path (that reads local rows, see
`controlplane.payments.access`).

Conventions:
- every create carries an idempotency key derived from our own ids, so a retried
  call (the SDK's own retries, a re-run task) cannot create a second object in
  real Stripe. localstripe ignores these keys, so each function also checks its
  own bookkeeping before creating (see README, "Stripe: what is exercised
  against localstripe");
- Stripe objects come back as plain dicts (`to_dict()`), never SDK objects, so
  the rest of the code does not depend on the SDK's classes;
- an empty STRIPE_API_KEY means billing through Stripe is off: every function
  raises `BillingDisabled` (503, `billing_disabled`) instead of crashing.
- plans are mirrored with the Plans API (localstripe has no Prices API); real
  Stripe accepts a plan id wherever a price id is expected.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from decimal import ROUND_HALF_UP, Decimal
from typing import Any, Protocol

import stripe
import structlog
from django.conf import settings
from django.db import IntegrityError, transaction

from controlplane.core.errors import ApiError
from controlplane.tenancy.models import Organization

from .models import StripeCustomer

log = structlog.get_logger(__name__)

StripeObject = dict[str, Any]


class BillingDisabled(ApiError):
    status_code = 503
    default_code = "billing_disabled"


class PaymentProviderError(ApiError):
    """Stripe refused or could not be reached; the message says which and what to do."""

    status_code = 503
    default_code = "payment_provider_error"


class StripeObjectMissing(PaymentProviderError):
    """Stripe answered 404 for an object we named: retrying will not make it appear."""

    status_code = 404
    default_code = "stripe_object_missing"


def enabled() -> bool:
    return bool(settings.STRIPE_API_KEY)


@functools.lru_cache(maxsize=4)
def _client_for(api_key: str, api_base: str, retries: int) -> stripe.StripeClient:
    return stripe.StripeClient(
        api_key,
        base_addresses={"api": api_base or None},
        max_network_retries=retries,
    )


def client() -> stripe.StripeClient:
    if not enabled():
        raise BillingDisabled(
            "Billing through Stripe is not configured on this server (STRIPE_API_KEY is "
            "empty). Ask the operator to set it; usage is still metered meanwhile."
        )
    return _client_for(
        settings.STRIPE_API_KEY, settings.STRIPE_API_BASE, settings.STRIPE_MAX_NETWORK_RETRIES
    )


def _call(what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> StripeObject:
    """Run one SDK call; Stripe's errors become ApiErrors that say what happened."""
    try:
        result = fn(*args, **kwargs)
    except stripe.CardError as exc:
        raise ApiError(
            f"The card was declined while trying to {what}: {exc.user_message or exc}. "
            "Use another payment method.",
            status_code=402,
            code=exc.code or "card_declined",
        ) from exc
    except stripe.InvalidRequestError as exc:
        if exc.http_status != 404:
            raise _provider_error(what, exc) from exc
        log.warning("payments.stripe_object_missing", action=what, error=str(exc))
        raise StripeObjectMissing(
            f"Stripe has no such object; could not {what} ({exc.user_message or exc})."
        ) from exc
    except stripe.StripeError as exc:
        raise _provider_error(what, exc) from exc
    out: StripeObject = result.to_dict()
    return out


def _provider_error(what: str, exc: stripe.StripeError) -> PaymentProviderError:
    log.warning("payments.stripe_error", action=what, error=str(exc), status=exc.http_status)
    return PaymentProviderError(
        f"Stripe could not {what} ({type(exc).__name__}: {exc.user_message or exc}). "
        "Retry later; nothing was charged twice.",
    )


def _p(**params: Any) -> Any:
    # The SDK types params as TypedDicts; ours are built at run time.
    return params


def _idem(key: str) -> Any:
    return {"idempotency_key": key}


def cents(amount: Decimal) -> int:
    """USD (Decimal, as the ledger keeps money) to the smallest currency unit Stripe wants."""
    return int((amount * 100).quantize(Decimal(1), rounding=ROUND_HALF_UP))


# --- customers -----------------------------------------------------------------------


def customer_for(organization: Organization) -> str:
    """The organization's Stripe customer id, creating the customer on first use.

    Race-safe: the organization row is locked while the customer is created, so
    two concurrent first calls make one customer (the second waits, then reads
    the row the first wrote); the idempotency key covers a crash between
    Stripe's reply and our commit (real Stripe returns the same customer).
    """
    existing = (
        StripeCustomer.objects.for_organization(organization)
        .values_list("stripe_id", flat=True)
        .first()
    )
    if existing:
        return existing
    api = client()
    with transaction.atomic():
        Organization.objects.select_for_update().filter(pk=organization.pk).first()
        existing = (
            StripeCustomer.objects.for_organization(organization)
            .values_list("stripe_id", flat=True)
            .first()
        )
        if existing:
            return existing
        customer = _call(
            "create the customer",
            api.v1.customers.create,
            params=_p(name=organization.name, metadata={"organization_id": organization.pk}),
            options=_idem(f"atelier-customer-{organization.pk}"),
        )
        try:
            with transaction.atomic():
                StripeCustomer.objects.create(organization=organization, stripe_id=customer["id"])
        except IntegrityError:  # another process without the lock (cannot happen via here)
            return StripeCustomer.objects.for_organization(organization).get().stripe_id
    log.info("payments.customer_created", organization_id=organization.pk, customer=customer["id"])
    return str(customer["id"])


def payment_method_attach(*, organization: Organization, payment_method: str) -> None:
    """Attach a payment method (a `pm_…` id from Stripe.js) and make it the customer's default."""
    customer = customer_for(organization)
    api = client()
    _call(
        "attach the payment method",
        api.v1.payment_methods.attach,
        payment_method,
        params=_p(customer=customer),
    )
    _call(
        "set the default payment method",
        api.v1.customers.update,
        customer,
        params=_p(invoice_settings={"default_payment_method": payment_method}),
    )


# --- plans -------------------------------------------------------------------------


class PlanLike(Protocol):
    """What plan_sync needs of the ledger's Plan (controlplane.billing.models.Plan)."""

    code: str
    name: str
    monthly_price: Decimal
    stripe_product_id: str
    stripe_price_id: str

    def save(self, *, update_fields: Iterable[str]) -> None: ...


def stripe_plan_id(plan: PlanLike) -> str:
    """Deterministic, so a price change makes a new Stripe plan and never edits the old one."""
    return f"atelier-{plan.code}-{cents(plan.monthly_price)}-{settings.STRIPE_CURRENCY}-month"


def plan_sync(plan: PlanLike) -> str:
    """Mirror a billing Plan to a Stripe product + monthly plan; store and return the plan id.

    Stripe plans are immutable in amount, so the plan id encodes the price: after
    an admin changes `monthly_price`, the next sync creates a new plan (existing
    subscriptions stay on the old one until changed, as Stripe intends).
    Running it again with nothing changed calls Stripe at most to confirm.
    """
    api = client()
    wanted = stripe_plan_id(plan)
    changed: list[str] = []
    if not plan.stripe_product_id:
        product = _call(
            "create the plan's product",
            api.v1.products.create,
            params=_p(name=f"Atelier {plan.name}", metadata={"plan": plan.code}),
            options=_idem(f"atelier-product-{plan.code}"),
        )
        plan.stripe_product_id = product["id"]
        changed.append("stripe_product_id")
    if plan.stripe_price_id != wanted:
        try:
            _call(
                "create the plan's price",
                api.v1.plans.create,
                params=_p(
                    id=wanted,
                    product=plan.stripe_product_id,
                    amount=cents(plan.monthly_price),
                    currency=settings.STRIPE_CURRENCY,
                    interval="month",
                    nickname=plan.name,
                    metadata={"plan": plan.code},
                ),
                options=_idem(f"atelier-plan-{wanted}"),
            )
        except PaymentProviderError as exc:
            # A plan with this id exists already (an earlier sync whose save was lost).
            cause = exc.__cause__
            if not (isinstance(cause, stripe.StripeError) and cause.http_status in (400, 409)):
                raise
            _call("read the plan's price", api.v1.plans.retrieve, wanted)
        plan.stripe_price_id = wanted
        changed.append("stripe_price_id")
    if changed:
        plan.save(update_fields=changed)
        log.info("payments.plan_synced", plan=plan.code, stripe_plan=wanted)
    return wanted


# --- subscriptions -----------------------------------------------------------------


def subscription_create(
    *, customer: str, plan_id: str, organization_id: str, plan_code: str, key: str
) -> StripeObject:
    return _call(
        "start the subscription",
        client().v1.subscriptions.create,
        params=_p(
            customer=customer,
            items=[{"plan": plan_id}],
            metadata={"organization_id": organization_id, "plan": plan_code},
        ),
        options=_idem(key),
    )


def subscription_retrieve(subscription_id: str) -> StripeObject:
    return _call("read the subscription", client().v1.subscriptions.retrieve, subscription_id)


def subscription_update_plan(
    *, subscription_id: str, item_id: str, plan_id: str, plan_code: str, key: str
) -> StripeObject:
    # Stripe prorates by default (proration_behavior=create_prorations): the unused
    # time of the old plan is credited and the new plan charged for the rest.
    return _call(
        "change the subscription's plan",
        client().v1.subscriptions.update,
        subscription_id,
        params=_p(items=[{"id": item_id, "plan": plan_id}], metadata={"plan": plan_code}),
        options=_idem(key),
    )


def subscription_cancel_at_period_end(subscription_id: str, *, cancel: bool) -> StripeObject:
    return _call(
        "schedule the cancellation",
        client().v1.subscriptions.update,
        subscription_id,
        params=_p(cancel_at_period_end=cancel),
    )


def subscription_cancel_now(subscription_id: str) -> StripeObject:
    return _call("cancel the subscription", client().v1.subscriptions.cancel, subscription_id)


# --- invoices ----------------------------------------------------------------------


def invoices_of(customer: str) -> list[StripeObject]:
    page = _call(
        "list the customer's invoices",
        client().v1.invoices.list,
        params=_p(customer=customer, limit=100),
    )
    return list(page.get("data", []))


def pending_items_of(customer: str) -> list[StripeObject]:
    """The customer's invoice items not yet on an invoice (every page)."""
    api = client()
    out: list[StripeObject] = []
    after: str | None = None
    while True:
        params = {"customer": customer, "limit": 100}
        if after:
            params["starting_after"] = after
        page = _call("list the customer's invoice items", api.v1.invoice_items.list, params=params)
        data = list(page.get("data", []))
        out.extend(item for item in data if not item.get("invoice"))
        if not page.get("has_more") or not data:
            return out
        after = data[-1]["id"]


def invoice_item_create(
    *, customer: str, amount_cents: int, currency: str, description: str, metadata: dict[str, str]
) -> StripeObject:
    return _call(
        "add an invoice item",
        client().v1.invoice_items.create,
        params=_p(
            customer=customer,
            amount=amount_cents,
            currency=currency,
            description=description[:500],
            metadata=metadata,
        ),
        options=_idem(f"atelier-invoice-line-{metadata['atelier_invoice_line_id']}"),
    )


def invoice_create(*, customer: str, invoice_id: str, organization_id: str) -> StripeObject:
    """A draft invoice holding the customer's pending items, tagged with our invoice id."""
    metadata = {"atelier_invoice_id": invoice_id, "organization_id": organization_id}
    api = client()
    created = _call(
        "create the invoice",
        api.v1.invoices.create,
        params=_p(customer=customer, pending_invoice_items_behavior="include", metadata=metadata),
        options=_idem(f"atelier-invoice-{invoice_id}"),
    )
    if (created.get("metadata") or {}).get("atelier_invoice_id") != invoice_id:
        # localstripe drops metadata on create; the tag is what a resumed push looks for.
        created = _call(
            "tag the invoice", api.v1.invoices.update, created["id"], params=_p(metadata=metadata)
        )
    return created


def invoice_retrieve(stripe_invoice_id: str) -> StripeObject:
    return _call("read the invoice", client().v1.invoices.retrieve, stripe_invoice_id)


def invoice_pay(stripe_invoice_id: str) -> StripeObject:
    """Finalize a draft invoice and try to collect it now (Stripe's `pay` does both).

    Used instead of `finalize_invoice` (which localstripe lacks); a decline
    leaves the invoice open, Stripe retries it, and `invoice.payment_failed`
    starts dunning here.
    """
    return _call("finalize and collect the invoice", client().v1.invoices.pay, stripe_invoice_id)


# --- credits -----------------------------------------------------------------------


def credit_payment_intent(*, organization: Organization, amount: Decimal, key: str) -> StripeObject:
    """A PaymentIntent for a prepaid credit purchase; `payment_intent.succeeded` grants it."""
    return _call(
        "start the credit purchase",
        client().v1.payment_intents.create,
        params=_p(
            amount=cents(amount),
            currency=settings.STRIPE_CURRENCY,
            customer=customer_for(organization),
            metadata={
                "atelier_purpose": "credits",
                "organization_id": organization.pk,
                "credit_amount": str(amount),
            },
        ),
        options=_idem(key),
    )


def signature_verify(payload: bytes, header: str | None) -> None:
    """Raise ValueError unless `header` signs `payload` (raw bytes) with our secret, recently.

    Stripe's scheme: HMAC-SHA256 over "<t>.<raw body>", header `t=…,v1=…`; the
    SDK checks signatures and age (STRIPE_WEBHOOK_TOLERANCE_SECONDS).
    """
    secret = settings.STRIPE_WEBHOOK_SECRET
    if not secret:
        raise ValueError("the webhook secret is not configured on this server")
    try:
        stripe.WebhookSignature.verify_header(
            payload, header, secret, tolerance=settings.STRIPE_WEBHOOK_TOLERANCE_SECONDS
        )
    except stripe.SignatureVerificationError as exc:
        raise ValueError(str(exc).split("\n")[0]) from None
