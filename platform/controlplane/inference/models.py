"""Deployments (what makes a customer model callable) and the usage of every inference request.

A base model is always callable, from the shared serverless pool. A customer
model is callable while it has an *active* deployment: `serverless` (shared
pool, scales to zero, loaded on demand) or `dedicated` (`min_replicas` kept
loaded). Deleting a deployment keeps its row (`status=deleted`), so at most one
deployment per model is active, enforced by a partial unique constraint.

`UsageRecord` is what a worker reported for one request, stored once under the
request's id: the ledger billing prices (issue #6).
"""

from __future__ import annotations

from django.conf import settings
from django.db import models

from controlplane.core.ids import new_deployment_id, new_inference_usage_id
from controlplane.core.scoping import OrganizationOwned, OrganizationScopedManager


class DeploymentType(models.TextChoices):
    SERVERLESS = "serverless"
    DEDICATED = "dedicated"


class DeploymentStatus(models.TextChoices):
    ACTIVE = "active"
    DELETED = "deleted"


class Deployment(OrganizationOwned):
    id = models.CharField(
        primary_key=True, max_length=40, default=new_deployment_id, editable=False
    )
    #: A base model's name or a customer model's id (`ft:…`): either kind, so not a foreign key.
    model_id = models.CharField(max_length=300)
    type = models.CharField(max_length=16, choices=DeploymentType.choices)
    min_replicas = models.PositiveSmallIntegerField(default=0)
    max_replicas = models.PositiveSmallIntegerField(default=1)
    status = models.CharField(
        max_length=16, choices=DeploymentStatus.choices, default=DeploymentStatus.ACTIVE
    )
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)
    deleted_at = models.DateTimeField(null=True, blank=True)

    objects = OrganizationScopedManager["Deployment"]()

    class Meta(OrganizationOwned.Meta):
        constraints = [
            models.UniqueConstraint(
                fields=["organization", "model_id"],
                condition=models.Q(status="active"),
                name="one_active_deployment_per_model",
            ),
            models.CheckConstraint(
                condition=models.Q(min_replicas__lte=models.F("max_replicas")),
                name="deployment_min_replicas_lte_max",
            ),
            models.CheckConstraint(
                condition=models.Q(type="serverless", min_replicas=0)
                | models.Q(type="dedicated", min_replicas__gte=1),
                name="deployment_replicas_match_type",
            ),
        ]
        indexes = [models.Index(fields=["organization", "-id"], name="deployment_org_newest")]

    def __str__(self) -> str:
        return f"{self.pk} ({self.model_id}, {self.type}, {self.status})"

    @property
    def is_active(self) -> bool:
        return self.status == DeploymentStatus.ACTIVE


class UsageKind(models.TextChoices):
    CHAT = "chat"
    COMPLETION = "completion"
    EMBEDDING = "embedding"
    CLASSIFICATION = "classification"


class UsageStatus(models.TextChoices):
    COMPLETED = "completed"
    CANCELLED = "cancelled"
    FAILED = "failed"


class UsageRecord(OrganizationOwned):
    """Tokens one inference request used, as its worker reported them (exactly once)."""

    id = models.CharField(
        primary_key=True, max_length=40, default=new_inference_usage_id, editable=False
    )
    #: The gateway's id of the request: the idempotency key of its usage report.
    request_id = models.CharField(max_length=200, unique=True)
    #: The caller's `x-request-id` (the web's log lines carry it as `request_id`; the
    #: worker's `inference.request` line as `trace_id`): "" from older workers.
    trace_id = models.CharField(max_length=200, blank=True, default="", db_index=True)
    #: None when no API key made the request (as reported): not the same as an empty id.
    api_key_id = models.CharField(max_length=40, null=True, blank=True)  # noqa: DJ001
    model = models.CharField(max_length=300)
    kind = models.CharField(max_length=16, choices=UsageKind.choices)
    prompt_tokens = models.PositiveIntegerField()
    completion_tokens = models.PositiveIntegerField()
    status = models.CharField(max_length=16, choices=UsageStatus.choices)
    latency_ms = models.FloatField()
    #: When the request ran (the report's `at`): what usage periods are cut on.
    created_at = models.DateTimeField()
    recorded_at = models.DateTimeField(auto_now_add=True)

    objects = OrganizationScopedManager["UsageRecord"]()

    class Meta(OrganizationOwned.Meta):
        indexes = [models.Index(fields=["organization", "created_at"], name="usage_org_created")]

    def __str__(self) -> str:
        return f"{self.request_id} ({self.model}, {self.total_tokens} tokens)"

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens
