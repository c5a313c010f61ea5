"""What Atelier remembers of Stripe: customers, subscriptions, pushed invoices, dunning, events.

Stripe is the source of truth for money; these rows are the local mirror the
request path reads (never a Stripe round trip per inference request).
"""

from __future__ import annotations

from django.db import models

from controlplane.core.ids import new_id
from controlplane.core.scoping import OrganizationOwned, OrganizationScopedManager


# Migrations serialise defaults by import path, so each prefix has a named function.
def new_stripe_customer_id() -> str:
    return new_id("stcus")


def new_subscription_id() -> str:
    return new_id("subs")


def new_dunning_id() -> str:
    return new_id("dun")


def new_stripe_invoice_id() -> str:
    return new_id("stinv")


class StripeCustomer(OrganizationOwned):
    """The one Stripe customer of an organization, created lazily on first need."""

    id = models.CharField(
        primary_key=True, max_length=40, default=new_stripe_customer_id, editable=False
    )
    stripe_id = models.CharField(max_length=255, unique=True)
    created_at = models.DateTimeField(auto_now_add=True)

    objects = OrganizationScopedManager["StripeCustomer"]()

    class Meta(OrganizationOwned.Meta):
        constraints = [
            models.UniqueConstraint(fields=["organization"], name="one_stripe_customer_per_org")
        ]

    def __str__(self) -> str:
        return f"{self.stripe_id} for {self.organization_id}"


class SubscriptionStatus(models.TextChoices):
    """Stripe's subscription statuses, plus `none` for an organization that never subscribed."""

    NONE = "none"
    INCOMPLETE = "incomplete"
    INCOMPLETE_EXPIRED = "incomplete_expired"
    TRIALING = "trialing"
    ACTIVE = "active"
    PAST_DUE = "past_due"
    UNPAID = "unpaid"
    CANCELED = "canceled"
    PAUSED = "paused"


#: Statuses Stripe never leaves: a late event cannot bring such a subscription back.
TERMINAL_STATUSES = frozenset({SubscriptionStatus.CANCELED, SubscriptionStatus.INCOMPLETE_EXPIRED})


class Subscription(OrganizationOwned):
    """The organization's subscription as Stripe last told us.

    Every write stores the subscription as read from Stripe's API while this row
    is locked (`services.subscription_sync`), never the copy inside a webhook
    event, so the order in which events arrive cannot roll it back. `state_at` is
    the latest Unix second a stored state was for (the event's `created`, or the
    API call's time); it only grows, and keys idempotent subscription changes.
    """

    id = models.CharField(
        primary_key=True, max_length=40, default=new_subscription_id, editable=False
    )
    stripe_subscription_id = models.CharField(max_length=255, blank=True, db_index=True)
    plan = models.CharField(max_length=64, blank=True)
    status = models.CharField(
        max_length=24, choices=SubscriptionStatus.choices, default=SubscriptionStatus.NONE
    )
    current_period_end = models.DateTimeField(null=True, blank=True)
    cancel_at_period_end = models.BooleanField(default=False)
    state_at = models.BigIntegerField(default=0)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    objects = OrganizationScopedManager["Subscription"]()

    class Meta(OrganizationOwned.Meta):
        constraints = [
            models.UniqueConstraint(fields=["organization"], name="one_subscription_per_org")
        ]

    def __str__(self) -> str:
        return f"{self.organization_id}: {self.plan or '-'} ({self.status})"


class Dunning(OrganizationOwned):
    """A Stripe invoice whose payment failed: inference is suspended once `grace_ends_at` passes.

    Resolved (not deleted) when the invoice is paid, so a `payment_failed` event
    delivered after the `paid` one cannot start dunning again.
    """

    id = models.CharField(primary_key=True, max_length=40, default=new_dunning_id, editable=False)
    stripe_invoice_id = models.CharField(max_length=255, unique=True)
    hosted_invoice_url = models.URLField(max_length=1000, blank=True)
    amount_due = models.BigIntegerField(default=0)  # smallest currency unit, as Stripe sends it
    currency = models.CharField(max_length=8, blank=True)
    started_at = models.DateTimeField()
    grace_ends_at = models.DateTimeField()
    resolved_at = models.DateTimeField(null=True, blank=True)

    objects = OrganizationScopedManager["Dunning"]()

    class Meta(OrganizationOwned.Meta):
        indexes = [
            models.Index(
                fields=["organization", "grace_ends_at"],
                condition=models.Q(resolved_at__isnull=True),
                name="dunning_open_by_org",
            )
        ]

    def __str__(self) -> str:
        state = "resolved" if self.resolved_at else f"grace until {self.grace_ends_at:%Y-%m-%d}"
        return f"{self.stripe_invoice_id} ({state})"


class StripeInvoice(OrganizationOwned):
    """A ledger invoice pushed to Stripe: the row that makes pushing it twice create nothing."""

    id = models.CharField(
        primary_key=True, max_length=40, default=new_stripe_invoice_id, editable=False
    )
    invoice_id = models.CharField(max_length=64, unique=True)  # the ledger's Invoice pk
    stripe_invoice_id = models.CharField(max_length=255, blank=True)
    status = models.CharField(max_length=24, blank=True)  # Stripe's invoice status
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    objects = OrganizationScopedManager["StripeInvoice"]()

    def __str__(self) -> str:
        return f"{self.invoice_id} → {self.stripe_invoice_id or '(not yet)'}"


class StripeEvent(models.Model):
    """A webhook event, stored in the same transaction as its effect: a replay finds it and stops.

    Not organization-owned: some events belong to no organization (products,
    plans), and only staff read these rows.
    """

    id = models.CharField(primary_key=True, max_length=255)  # Stripe's `evt_…`
    type = models.CharField(max_length=100)
    created = models.BigIntegerField()  # Stripe's event time, Unix seconds
    organization = models.ForeignKey(
        "tenancy.Organization",
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
    )
    outcome = models.CharField(max_length=200)  # what processing did, for people reading admin
    #: Why a permanent failure (outcome "failed") could not be applied; Stripe is not asked to
    #: retry it, so a person reads this in admin.
    failure = models.TextField(blank=True, default="")
    payload = models.JSONField()
    received_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-received_at"]

    def __str__(self) -> str:
        return f"{self.id} {self.type}: {self.outcome}"
