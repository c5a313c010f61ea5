"""Batches (OpenAI's Batch API): a `batch` file of requests, run line by line.

Each line of the input file becomes a `BatchLine` row when the batch starts: its
result (the response body, or the error) is written to that row, once, by a
conditional UPDATE (`status = pending`), so a runner that dies mid-batch loses
nothing recorded and a line is never answered twice. The output and error files
are written from the rows when the batch ends.
"""

from __future__ import annotations

from django.db import models

from controlplane.core.ids import new_id
from controlplane.core.scoping import OrganizationOwned, OrganizationScopedManager

#: The only window OpenAI offers, and ours.
COMPLETION_WINDOWS = ("24h",)


def new_batch_id() -> str:
    return new_id("batch")


class BatchStatus(models.TextChoices):
    VALIDATING = "validating"
    IN_PROGRESS = "in_progress"
    FINALIZING = "finalizing"
    COMPLETED = "completed"
    FAILED = "failed"
    EXPIRED = "expired"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"


#: Statuses a batch never leaves.
FINISHED = frozenset(
    {BatchStatus.COMPLETED, BatchStatus.FAILED, BatchStatus.EXPIRED, BatchStatus.CANCELLED}
)

#: Statuses a runner works on (the reaper sends a batch left in one without a runner).
ACTIVE = (
    BatchStatus.VALIDATING,
    BatchStatus.IN_PROGRESS,
    BatchStatus.FINALIZING,
    BatchStatus.CANCELLING,
)


class Batch(OrganizationOwned):
    id = models.CharField(primary_key=True, max_length=40, default=new_batch_id, editable=False)
    endpoint = models.CharField(max_length=64)
    completion_window = models.CharField(max_length=8, default="24h")
    status = models.CharField(
        max_length=16, choices=BatchStatus.choices, default=BatchStatus.VALIDATING
    )
    # Files are deleted softly (`deleted_at`); a hard delete is the organization's own.
    input_file = models.ForeignKey("datasets.File", on_delete=models.CASCADE, related_name="+")
    output_file = models.ForeignKey(
        "datasets.File", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    error_file = models.ForeignKey(
        "datasets.File", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    #: Batch-level errors (a batch that failed validation), OpenAI's `errors.data`.
    errors = models.JSONField(null=True, blank=True)
    metadata = models.JSONField(null=True, blank=True)
    #: The key that created it: the lines run (and are budgeted) as that key.
    api_key_id = models.CharField(max_length=40, null=True, blank=True)  # noqa: DJ001
    created_by = models.ForeignKey(
        "accounts.User", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    total = models.IntegerField(default=0)
    completed = models.IntegerField(default=0)
    failed = models.IntegerField(default=0)
    created_at = models.DateTimeField(auto_now_add=True)
    expires_at = models.DateTimeField()
    in_progress_at = models.DateTimeField(null=True, blank=True)
    finalizing_at = models.DateTimeField(null=True, blank=True)
    completed_at = models.DateTimeField(null=True, blank=True)
    failed_at = models.DateTimeField(null=True, blank=True)
    expired_at = models.DateTimeField(null=True, blank=True)
    cancelling_at = models.DateTimeField(null=True, blank=True)
    cancelled_at = models.DateTimeField(null=True, blank=True)

    objects = OrganizationScopedManager["Batch"]()

    class Meta(OrganizationOwned.Meta):
        verbose_name_plural = "batches"
        indexes = [
            models.Index(fields=["organization", "-id"], name="batch_org_id"),
            # The reaper's scan: the unfinished few among every batch ever run.
            models.Index(
                fields=["created_at"],
                condition=models.Q(status__in=[s.value for s in ACTIVE]),
                name="batch_active",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.id} ({self.status})"


class LineStatus(models.TextChoices):
    PENDING = "pending"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


class BatchLine(models.Model):
    """One request of a batch and, once it ran, its result (written once)."""

    id = models.BigAutoField(primary_key=True)
    batch = models.ForeignKey(Batch, on_delete=models.CASCADE, related_name="lines")
    #: The line's place in the input file (the output keeps this order).
    index = models.IntegerField()
    custom_id = models.CharField(max_length=512)
    url = models.CharField(max_length=200)
    body = models.JSONField()
    status = models.CharField(max_length=16, choices=LineStatus.choices, default=LineStatus.PENDING)
    #: How many times it was sent to a worker (a lost worker's lines are sent again).
    attempts = models.IntegerField(default=0)
    request_id = models.CharField(max_length=200, blank=True, default="")
    #: OpenAI's `response`: {status_code, request_id, body}, or None.
    response = models.JSONField(null=True, blank=True)
    #: OpenAI's `error`: {code, message}, or None.
    error = models.JSONField(null=True, blank=True)
    prompt_tokens = models.IntegerField(default=0)
    completion_tokens = models.IntegerField(default=0)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["batch", "custom_id"], name="batch_line_custom_id"),
            models.UniqueConstraint(fields=["batch", "index"], name="batch_line_index"),
        ]
        indexes = [
            models.Index(
                fields=["batch", "index"],
                condition=models.Q(status="pending"),
                name="batch_line_pending",
            )
        ]

    def __str__(self) -> str:
        return f"{self.batch_id}/{self.custom_id} ({self.status})"
