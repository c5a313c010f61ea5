"""Custom engagements: bespoke model projects staff run for one customer organization.

An engagement moves along a pipeline (`TRANSITIONS`, the only moves there are), has a
budget (training tokens, GPU-seconds and money) that the jobs staff launch for it are
charged to, milestones billed through Stripe, and events the customer reads at
`/v1/engagements`. Jobs and the models they make stay in the customer's organization,
marked with the engagement's id (`Job.engagement_id`, `CustomerModel.engagement_id`):
jobs sits below this app and cannot point a foreign key here.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any, Final

from django.conf import settings
from django.core.validators import MinValueValidator
from django.db import models

from controlplane.core.ids import new_engagement_event_id, new_engagement_id, new_milestone_id
from controlplane.core.scoping import OrganizationOwned, OrganizationScopedManager


class EngagementStatus(models.TextChoices):
    LEAD = "lead"
    SCOPING = "scoping"
    PROPOSAL = "proposal"
    ACTIVE = "active"
    DELIVERED = "delivered"
    CLOSED = "closed"
    CANCELLED = "cancelled"


S = EngagementStatus

#: Every allowed move, and no other. Forward along the pipeline, with two ways back
#: (a proposal sent back to scoping; a delivery reopened for rework), and `cancelled`
#: from any status that is not terminal.
TRANSITIONS: Final[dict[str, tuple[str, ...]]] = {
    S.LEAD: (S.SCOPING, S.CANCELLED),
    S.SCOPING: (S.PROPOSAL, S.CANCELLED),
    S.PROPOSAL: (S.ACTIVE, S.SCOPING, S.CANCELLED),
    S.ACTIVE: (S.DELIVERED, S.CANCELLED),
    S.DELIVERED: (S.CLOSED, S.ACTIVE, S.CANCELLED),
    S.CLOSED: (),
    S.CANCELLED: (),
}
TERMINAL: Final = frozenset(s for s, moves in TRANSITIONS.items() if not moves)
#: Where staff may launch jobs (the work is agreed), deliver models and bill milestones.
LAUNCHABLE: Final = frozenset({S.ACTIVE})
DELIVERABLE: Final = frozenset({S.ACTIVE, S.DELIVERED})
BILLABLE: Final = frozenset({S.ACTIVE, S.DELIVERED, S.CLOSED})


class Engagement(OrganizationOwned):
    id = models.CharField(
        primary_key=True, max_length=40, default=new_engagement_id, editable=False
    )
    title = models.CharField(max_length=200)
    scope = models.TextField(blank=True, help_text="What is to be built, as agreed.")
    status = models.CharField(
        max_length=16, choices=EngagementStatus.choices, default=EngagementStatus.LEAD
    )
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.PROTECT,
        related_name="+",
        limit_choices_to={"is_staff": True},
        help_text="The staff member who runs it.",
    )
    owner_display_name = models.CharField(
        max_length=100,
        blank=True,
        help_text="The name the customer sees (empty: the owner's name). Never an email.",
    )
    budget_tokens = models.PositiveBigIntegerField(help_text="Training tokens.")
    budget_gpu_seconds = models.PositiveBigIntegerField(help_text="GPU-seconds of job run time.")
    budget_amount = models.DecimalField(
        max_digits=12,
        decimal_places=2,
        validators=[MinValueValidator(Decimal(0))],
        help_text="USD of compute, at price-book prices.",
    )
    internal_notes = models.TextField(
        blank=True, help_text="Staff only; never shown to the customer."
    )
    #: The customer's data it uses (jobs launched for it add theirs).
    files = models.ManyToManyField("datasets.File", blank=True, related_name="+")
    dataset_versions = models.ManyToManyField(
        "datasets.DatasetVersion", blank=True, related_name="+"
    )
    status_changed_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    objects = OrganizationScopedManager["Engagement"]()

    class Meta(OrganizationOwned.Meta):
        permissions = [
            ("launch_job", "Can launch jobs for an engagement"),
            ("deliver_model", "Can deliver an engagement's models"),
            ("bill_milestone", "Can bill an engagement's milestones"),
            ("move_engagement", "Can move an engagement along its pipeline"),
        ]
        indexes = [
            models.Index(fields=["organization", "-id"], name="engagement_org"),
            models.Index(fields=["status"], name="engagement_status"),
        ]

    def __str__(self) -> str:
        return f"{self.title} ({self.pk})"

    @property
    def allowed_transitions(self) -> tuple[str, ...]:
        return TRANSITIONS[self.status]

    @property
    def owner_name(self) -> str:
        """What the customer sees of the owner: a display name, never an email."""
        return self.owner_display_name or getattr(self.owner, "name", "") or "Atelier team"


class MilestoneStatus(models.TextChoices):
    PENDING = "pending"
    ACCEPTED = "accepted"
    BILLED = "billed"


class Milestone(OrganizationOwned):
    id = models.CharField(primary_key=True, max_length=40, default=new_milestone_id, editable=False)
    engagement = models.ForeignKey(Engagement, on_delete=models.CASCADE, related_name="milestones")
    title = models.CharField(max_length=200)
    due_date = models.DateField(null=True, blank=True)
    amount = models.DecimalField(
        max_digits=12, decimal_places=2, validators=[MinValueValidator(Decimal(0))]
    )
    status = models.CharField(
        max_length=16, choices=MilestoneStatus.choices, default=MilestoneStatus.PENDING
    )
    acceptance_notes = models.TextField(blank=True)
    stripe_invoice_item_id = models.CharField(max_length=100, blank=True)
    stripe_invoice_id = models.CharField(max_length=100, blank=True)
    stripe_invoice_status = models.CharField(max_length=32, blank=True)
    billed_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    objects = OrganizationScopedManager["Milestone"]()

    class Meta(OrganizationOwned.Meta):
        ordering = ["due_date", "id"]
        indexes = [models.Index(fields=["engagement", "status"], name="milestone_engagement")]

    def __str__(self) -> str:
        return f"{self.title} ({self.amount} USD, {self.status})"

    def save(self, *args: Any, **kwargs: Any) -> None:
        # A milestone lives in its engagement's organization (admin inlines do not set it).
        if self.engagement_id is not None:
            self.organization_id = self.engagement.organization_id
        super().save(*args, **kwargs)

    @property
    def billing_key(self) -> str:
        """Our id for it on Stripe: its invoice item and invoice are tagged with it, and their
        idempotency keys derive from it."""
        return f"milestone-{self.pk}"


class EventKind(models.TextChoices):
    MESSAGE = "message"
    STATUS = "status"
    JOB = "job"
    DELIVERY = "delivery"
    BILLING = "billing"


class EngagementEvent(OrganizationOwned):
    """A message the customer reads on their engagement (what staff did, in their words)."""

    id = models.CharField(
        primary_key=True, max_length=40, default=new_engagement_event_id, editable=False
    )
    engagement = models.ForeignKey(Engagement, on_delete=models.CASCADE, related_name="events")
    kind = models.CharField(max_length=16, choices=EventKind.choices, default=EventKind.MESSAGE)
    message = models.TextField(max_length=2000)
    created_at = models.DateTimeField(auto_now_add=True)

    objects = OrganizationScopedManager["EngagementEvent"]()

    class Meta(OrganizationOwned.Meta):
        indexes = [models.Index(fields=["engagement", "-id"], name="engagement_event")]

    def __str__(self) -> str:
        return self.message[:80]

    def save(self, *args: Any, **kwargs: Any) -> None:
        if self.engagement_id is not None:
            self.organization_id = self.engagement.organization_id
        super().save(*args, **kwargs)
