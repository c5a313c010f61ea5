"""Per-organization webhooks, the events sent to them, and every delivery attempt."""

from __future__ import annotations

from django.db import models

from controlplane.core.ids import new_id
from controlplane.core.scoping import OrganizationOwned, OrganizationScopedManager


def new_webhook_id() -> str:
    return new_id("wh")


def new_event_id() -> str:
    return new_id("evt")


def new_delivery_id() -> str:
    return new_id("whdel")


class Webhook(OrganizationOwned):
    id = models.CharField(primary_key=True, max_length=40, default=new_webhook_id, editable=False)
    url = models.CharField(max_length=2048)
    #: Event types (or "*"): see `events.EVENT_TYPES`.
    events = models.JSONField(default=list)
    description = models.CharField(max_length=500, blank=True, default="")
    enabled = models.BooleanField(default=True)
    #: `whsec_…`, kept to sign deliveries (shown to the customer once, at create/rotate).
    secret = models.CharField(max_length=100)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    objects = OrganizationScopedManager["Webhook"]()

    def __str__(self) -> str:
        return f"{self.pk} → {self.url}"

    def wants(self, event_type: str) -> bool:
        return self.enabled and ("*" in self.events or event_type in self.events)


class WebhookEvent(OrganizationOwned):
    """One thing that happened, sent to every webhook that wants it (once: `key`)."""

    id = models.CharField(primary_key=True, max_length=40, default=new_event_id, editable=False)
    type = models.CharField(max_length=64)
    #: What makes it one event (type and object id): a signal sent twice sends nothing new.
    key = models.CharField(max_length=200)
    data = models.JSONField(default=dict)
    created_at = models.DateTimeField(auto_now_add=True)

    objects = OrganizationScopedManager["WebhookEvent"]()

    class Meta(OrganizationOwned.Meta):
        constraints = [
            models.UniqueConstraint(fields=["organization", "key"], name="one_event_per_key")
        ]

    def __str__(self) -> str:
        return f"{self.pk} ({self.type})"


class DeliveryOutcome(models.TextChoices):
    SUCCEEDED = "succeeded"
    RETRYING = "retrying"  # failed; `next_retry_at` says when the next attempt goes
    FAILED = "failed"  # failed for good (a 4xx, the last attempt, a refused address)


class WebhookDelivery(OrganizationOwned):
    """One attempt to send one event to one webhook."""

    id = models.CharField(primary_key=True, max_length=40, default=new_delivery_id, editable=False)
    webhook = models.ForeignKey(Webhook, on_delete=models.CASCADE, related_name="deliveries")
    event = models.ForeignKey(WebhookEvent, on_delete=models.CASCADE, related_name="deliveries")
    attempt = models.PositiveSmallIntegerField()
    outcome = models.CharField(max_length=10, choices=DeliveryOutcome.choices)
    status_code = models.PositiveSmallIntegerField(null=True, blank=True)
    error = models.CharField(max_length=500, blank=True, default="")
    duration_ms = models.PositiveIntegerField(default=0)
    next_retry_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    objects = OrganizationScopedManager["WebhookDelivery"]()

    class Meta(OrganizationOwned.Meta):
        constraints = [
            models.UniqueConstraint(
                fields=["webhook", "event", "attempt"], name="one_row_per_attempt"
            )
        ]

    def __str__(self) -> str:
        return f"{self.event_id} → {self.webhook_id} #{self.attempt} ({self.outcome})"
