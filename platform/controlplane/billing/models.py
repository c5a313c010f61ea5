"""Billing data: plans, the price book, the usage ledger, credits and invoices.

Money is `Decimal` in USD everywhere. Invoice lines are rounded to cents once,
per line (ROUND_HALF_UP on the line's exact amount); totals are sums of rounded
lines, so an invoice always adds up.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any, NoReturn

from django.conf import settings
from django.db import models
from django.db.models.functions import Now

from controlplane.core.ids import new_id
from controlplane.core.scoping import OrganizationOwned, OrganizationScopedManager

WILDCARD = "*"


class Meter(models.TextChoices):
    """What a ledger entry counts. `quantity` is always an integer number of these units."""

    PROMPT_TOKENS = "inference.prompt_tokens", "Inference prompt tokens"
    COMPLETION_TOKENS = "inference.completion_tokens", "Inference completion tokens"
    TRAINING_TOKENS = "training.tokens", "Training tokens"
    COMPRESSION_JOB = "compression.job", "Compression jobs"
    #: Megabyte-days (10^6 bytes held for one UTC day, rounded up per organizationxday).
    STORAGE_MB_DAY = "storage.mb_day", "Storage MB-days"
    #: Tokens a customer trained on a partner's listing; owned by the partner (earnings).
    ROYALTY_TOKENS = "royalty.tokens", "Royalty tokens (partner earnings)"


#: Meters that are earnings for the organization, not charges: never invoiced.
EARNING_METERS = frozenset({Meter.ROYALTY_TOKENS})


def new_invoice_id() -> str:
    return new_id("in")


def new_invoice_line_id() -> str:
    return new_id("il")


def new_credit_grant_id() -> str:
    return new_id("credit")


def new_plan_assignment_id() -> str:
    return new_id("planassign")


class Plan(models.Model):
    """A commercial plan, kept as data (admin-editable; payments mirrors it to Stripe).

    `included_amount` is the usage, in USD at price-book prices, that the monthly
    fee covers: rating subtracts it (prorated with the plan) from the period's
    usage lines, never below zero.
    """

    code = models.CharField(primary_key=True, max_length=32)
    name = models.CharField(max_length=100)
    monthly_price = models.DecimalField(max_digits=12, decimal_places=2, default=Decimal("0"))
    included_amount = models.DecimalField(
        max_digits=12,
        decimal_places=2,
        default=Decimal("0"),
        help_text="USD of usage per month the monthly price includes.",
    )
    requests_per_minute = models.PositiveIntegerField()
    tokens_per_minute = models.PositiveIntegerField()
    requests_per_day = models.PositiveIntegerField(
        null=True, blank=True, help_text="Empty: unlimited."
    )
    concurrent_fine_tuning_jobs = models.PositiveIntegerField()
    max_tokens_cap = models.PositiveIntegerField(
        null=True, blank=True, help_text="Most max_tokens one inference request may ask for."
    )
    max_n = models.PositiveIntegerField(
        null=True, blank=True, help_text="Most choices (n) one inference request may ask for."
    )
    stripe_product_id = models.CharField(max_length=100, blank=True, default="")
    stripe_price_id = models.CharField(max_length=100, blank=True, default="")
    active = models.BooleanField(default=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["monthly_price", "code"]

    def __str__(self) -> str:
        return f"{self.name} ({self.code})"


class PlanBilledBy(models.TextChoices):
    """Who charges a plan's monthly fee: exactly one of them, so it is never charged twice."""

    #: The monthly ledger invoice has a prorated `plan` line (plans assigned by staff).
    INVOICE = "invoice"
    #: A Stripe subscription charges the fee itself; the ledger invoice shows the plan
    #: days at 0 (its included usage still applies).
    SUBSCRIPTION = "subscription"


class PlanAssignment(OrganizationOwned):
    """From `effective_from` on, the organization is on `plan` (history for proration)."""

    id = models.CharField(
        primary_key=True, max_length=40, default=new_plan_assignment_id, editable=False
    )
    plan = models.ForeignKey(Plan, on_delete=models.PROTECT, related_name="+")
    effective_from = models.DateTimeField()
    billed_by = models.CharField(
        max_length=16, choices=PlanBilledBy.choices, default=PlanBilledBy.INVOICE
    )
    created_at = models.DateTimeField(auto_now_add=True)

    objects = OrganizationScopedManager["PlanAssignment"]()

    class Meta(OrganizationOwned.Meta):
        indexes = [models.Index(fields=["organization", "effective_from"], name="plan_assign_org")]

    def __str__(self) -> str:
        return f"{self.organization_id} on {self.plan_id} from {self.effective_from}"


class PriceBookEntry(models.Model):
    """The price of one meter (for one model, or `*` for any) over a time range.

    Cost of `quantity` units = quantity x unit_price / per_units; e.g. tokens are
    priced per million (`per_units=1_000_000`), storage per GB-day over MB-days
    (`per_units=1000`), compression per job (`per_units=1`). History is never
    edited: a price change closes the open row (`effective_to`) and adds one.
    """

    meter = models.CharField(max_length=40, choices=Meter.choices)
    model = models.CharField(max_length=300, default=WILDCARD)
    unit = models.CharField(max_length=40, help_text="What unit_price is for, e.g. '1M tokens'.")
    per_units = models.PositiveBigIntegerField(default=1)
    unit_price = models.DecimalField(max_digits=20, decimal_places=10)
    effective_from = models.DateTimeField()
    effective_to = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        verbose_name_plural = "price book entries"
        ordering = ["meter", "model", "-effective_from"]
        constraints = [
            models.CheckConstraint(
                condition=models.Q(effective_to__isnull=True)
                | models.Q(effective_to__gt=models.F("effective_from")),
                name="price_range_forward",
            ),
            models.CheckConstraint(condition=models.Q(unit_price__gte=0), name="price_nonneg"),
            models.UniqueConstraint(
                fields=["meter", "model"],
                condition=models.Q(effective_to__isnull=True),
                name="one_open_price_per_meter_model",
            ),
        ]
        indexes = [models.Index(fields=["meter", "model", "effective_from"], name="price_lookup")]

    def __str__(self) -> str:
        return f"{self.meter}/{self.model}: {self.unit_price} per {self.unit}"


class AppendOnlyError(RuntimeError):
    """The ledger is append-only: entries are never changed or deleted."""


class LedgerQuerySet(models.QuerySet["LedgerEntry"]):
    def update(self, **kwargs: Any) -> NoReturn:
        raise AppendOnlyError("Ledger entries are append-only: add a correcting entry instead.")

    def delete(self) -> NoReturn:
        raise AppendOnlyError("Ledger entries are append-only: add a correcting entry instead.")


class LedgerManager(OrganizationScopedManager["LedgerEntry"]):
    """Scoped like every tenant manager; its querysets refuse update() and delete()."""

    _queryset_class = LedgerQuerySet


class LedgerEntry(OrganizationOwned):
    """One billable (or, for royalties, earning) event. Append-only, written once.

    `idempotency_key` is unique: writers derive it from the event's own identity
    (the request id, the job id, the organizationxday), so a report delivered
    twice, or re-sent after a crash, adds nothing. A PostgreSQL trigger refuses
    UPDATE and DELETE (see the migration), as do save() and the queryset.
    """

    id = models.BigAutoField(primary_key=True)
    # PROTECT: financial history outlives a deleted organization's other rows.
    organization = models.ForeignKey(
        "tenancy.Organization", on_delete=models.PROTECT, related_name="ledger_entries"
    )
    idempotency_key = models.CharField(max_length=255, unique=True)
    meter = models.CharField(max_length=40, choices=Meter.choices)
    model = models.CharField(max_length=300, blank=True, default="")
    quantity = models.BigIntegerField()
    occurred_at = models.DateTimeField()
    recorded_at = models.DateTimeField(db_default=Now())
    source = models.CharField(max_length=40)
    api_key_id = models.CharField(max_length=40, null=True, blank=True)  # noqa: DJ001
    member_id = models.CharField(max_length=40, null=True, blank=True)  # noqa: DJ001
    project_id = models.CharField(max_length=40, null=True, blank=True)  # noqa: DJ001
    #: What the event was about: a request id, a job id, a listing id…
    reference = models.CharField(max_length=200, blank=True, default="")
    #: A price agreed at the source (a listing's royalty), overriding the price book.
    unit_price = models.DecimalField(max_digits=20, decimal_places=10, null=True, blank=True)
    per_units = models.PositiveBigIntegerField(null=True, blank=True)
    #: Charged to a custom engagement's budget, not the organization's self-serve bill:
    #: invoices, budgets and the usage and costs APIs leave these entries out.
    engagement_id = models.CharField(max_length=40, null=True, blank=True)  # noqa: DJ001

    objects = LedgerManager()
    # Django internals (admin) read through this one: it refuses update/delete too.
    _plain = models.Manager.from_queryset(LedgerQuerySet)()  # type: ignore[misc]

    class Meta(OrganizationOwned.Meta):
        verbose_name_plural = "ledger entries"
        constraints = [
            models.CheckConstraint(condition=models.Q(quantity__gte=0), name="ledger_qty_nonneg"),
        ]
        indexes = [
            models.Index(fields=["organization", "occurred_at"], name="ledger_org_time"),
            models.Index(
                fields=["engagement_id"],
                condition=models.Q(engagement_id__isnull=False),
                name="ledger_engagement",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.meter} {self.model or '-'} x{self.quantity} ({self.idempotency_key})"

    def save(self, *args: Any, **kwargs: Any) -> None:
        if not self._state.adding:
            raise AppendOnlyError("Ledger entries are append-only: add a correcting entry instead.")
        super().save(*args, **kwargs)

    def delete(self, *args: Any, **kwargs: Any) -> NoReturn:
        raise AppendOnlyError("Ledger entries are append-only: add a correcting entry instead.")


class CreditSource(models.TextChoices):
    STAFF = "staff"
    PURCHASE = "purchase"
    PROMOTION = "promotion"


class CreditGrant(OrganizationOwned):
    """Prepaid credit (USD). Balance = grants - credits applied on invoices."""

    id = models.CharField(primary_key=True, max_length=40, default=new_credit_grant_id)
    amount = models.DecimalField(max_digits=12, decimal_places=2)
    source = models.CharField(max_length=16, choices=CreditSource.choices)
    idempotency_key = models.CharField(max_length=255, unique=True)
    note = models.CharField(max_length=500, blank=True, default="")
    granted_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)

    objects = OrganizationScopedManager["CreditGrant"]()

    class Meta(OrganizationOwned.Meta):
        constraints = [
            models.CheckConstraint(condition=models.Q(amount__gt=0), name="credit_positive"),
        ]

    def __str__(self) -> str:
        return f"{self.amount} USD to {self.organization_id} ({self.source})"


class InvoiceStatus(models.TextChoices):
    #: Stored, not yet accepted by Stripe.
    DRAFT = "draft"
    #: Pushed to Stripe and finalised there.
    OPEN = "open"
    PAID = "paid"
    VOID = "void"


class Invoice(OrganizationOwned):
    """One organization's bill for one calendar month (UTC). One per organizationxperiod."""

    id = models.CharField(primary_key=True, max_length=40, default=new_invoice_id, editable=False)
    period_start = models.DateTimeField()
    period_end = models.DateTimeField()
    currency = models.CharField(max_length=3, default="usd")
    subtotal = models.DecimalField(max_digits=14, decimal_places=2)
    credits_applied = models.DecimalField(max_digits=14, decimal_places=2, default=Decimal("0"))
    total = models.DecimalField(max_digits=14, decimal_places=2)
    status = models.CharField(
        max_length=8, choices=InvoiceStatus.choices, default=InvoiceStatus.DRAFT
    )
    stripe_invoice_id = models.CharField(max_length=100, blank=True, default="")
    pushed_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    objects = OrganizationScopedManager["Invoice"]()

    class Meta(OrganizationOwned.Meta):
        constraints = [
            models.UniqueConstraint(
                fields=["organization", "period_start"], name="one_invoice_per_period"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.pk}: {self.total} {self.currency} ({self.organization_id})"


class InvoiceLine(OrganizationOwned):
    id = models.CharField(
        primary_key=True, max_length=40, default=new_invoice_line_id, editable=False
    )
    invoice = models.ForeignKey(Invoice, on_delete=models.CASCADE, related_name="lines")
    #: plan | usage | included | credit
    kind = models.CharField(max_length=16)
    meter = models.CharField(max_length=40, blank=True, default="")
    model = models.CharField(max_length=300, blank=True, default="")
    description = models.CharField(max_length=500)
    quantity = models.BigIntegerField(default=0)
    unit_price = models.DecimalField(max_digits=20, decimal_places=10, null=True, blank=True)
    per_units = models.PositiveBigIntegerField(null=True, blank=True)
    amount = models.DecimalField(max_digits=14, decimal_places=2)

    objects = OrganizationScopedManager["InvoiceLine"]()

    class Meta(OrganizationOwned.Meta):
        ordering = ["id"]

    def __str__(self) -> str:
        return f"{self.description}: {self.amount}"
