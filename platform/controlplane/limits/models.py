"""Per-key rate-limit overrides, budgets, and the alerts budgets have sent.

Rate-limit *state* and budget *spend* live in Redis (see ratelimit.py and
budgets.py); these rows are the configuration, and the record that a soft
budget's threshold was crossed (once per period, enforced by a unique constraint).
"""

from __future__ import annotations

from django.db import models

from controlplane.core.ids import new_id
from controlplane.core.scoping import OrganizationOwned, OrganizationScopedManager


def new_key_limits_id() -> str:
    return new_id("keylim")


def new_budget_id() -> str:
    return new_id("budget")


def new_budget_alert_id() -> str:
    return new_id("budalert")


class KeyLimits(OrganizationOwned):
    """Rate limits of one API key. A null field means: the organization's plan decides."""

    id = models.CharField(primary_key=True, max_length=40, default=new_key_limits_id)
    api_key = models.OneToOneField(
        "accounts.APIKey", on_delete=models.CASCADE, related_name="limits"
    )
    requests_per_minute = models.PositiveIntegerField(null=True, blank=True)
    tokens_per_minute = models.PositiveIntegerField(null=True, blank=True)
    requests_per_day = models.PositiveIntegerField(null=True, blank=True)
    updated_at = models.DateTimeField(auto_now=True)

    objects = OrganizationScopedManager["KeyLimits"]()

    class Meta(OrganizationOwned.Meta):
        verbose_name = "API key limits"
        verbose_name_plural = "API key limits"

    def __str__(self) -> str:
        return f"limits of {self.api_key_id}"


class BudgetKind(models.TextChoices):
    HARD = "hard"  # requests are refused once it is spent
    SOFT = "soft"  # alerts only


class BudgetPeriod(models.TextChoices):
    MONTH = "month"  # calendar months, UTC
    DAYS = "days"  # every `period_days` days from `anchor`


class Budget(OrganizationOwned):
    """A spending cap in USD for the organization (api_key empty) or one of its keys."""

    id = models.CharField(primary_key=True, max_length=40, default=new_budget_id, editable=False)
    name = models.CharField(max_length=100, blank=True)
    api_key = models.ForeignKey(
        "accounts.APIKey",
        null=True,
        blank=True,
        on_delete=models.CASCADE,
        related_name="budgets",
        help_text="Empty: the budget covers the whole organization.",
    )
    amount = models.DecimalField(max_digits=14, decimal_places=6, help_text="USD per period")
    kind = models.CharField(max_length=8, choices=BudgetKind.choices, default=BudgetKind.HARD)
    period = models.CharField(
        max_length=8, choices=BudgetPeriod.choices, default=BudgetPeriod.MONTH
    )
    period_days = models.PositiveIntegerField(null=True, blank=True)
    anchor = models.DateTimeField(help_text="Start of the first period of a `days` budget.")
    #: Percentages of `amount` at which an alert is sent (once per period each).
    alert_thresholds = models.JSONField(default=list)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    objects = OrganizationScopedManager["Budget"]()

    class Meta(OrganizationOwned.Meta):
        indexes = [models.Index(fields=["organization", "-id"], name="budget_org_id")]
        constraints = [
            models.CheckConstraint(
                condition=models.Q(period="month") | models.Q(period_days__gte=1),
                name="budget_days_period_has_length",
            ),
            models.CheckConstraint(condition=models.Q(amount__gt=0), name="budget_amount_positive"),
        ]

    def __str__(self) -> str:
        return f"{self.name or self.pk}: {self.kind} ${self.amount} per {self.period}"


class BudgetAlert(OrganizationOwned):
    """A threshold of a budget crossed in one period: at most one row (and one email) each."""

    id = models.CharField(
        primary_key=True, max_length=40, default=new_budget_alert_id, editable=False
    )
    budget = models.ForeignKey(Budget, on_delete=models.CASCADE, related_name="alerts")
    period_start = models.DateTimeField()
    threshold = models.PositiveIntegerField(help_text="Percent of the budget's amount.")
    spent = models.DecimalField(max_digits=14, decimal_places=6)
    created_at = models.DateTimeField(auto_now_add=True)

    objects = OrganizationScopedManager["BudgetAlert"]()

    class Meta(OrganizationOwned.Meta):
        constraints = [
            models.UniqueConstraint(
                fields=["budget", "period_start", "threshold"], name="one_alert_per_threshold"
            )
        ]

    def __str__(self) -> str:
        return f"{self.budget_id} passed {self.threshold}% in period {self.period_start:%Y-%m-%d}"
