"""GPU jobs (fine-tuning, compression, evaluation), their events and checkpoints.

Both kinds share one table and one machinery: the lifecycle, attempts, leases,
fair queueing, events and idempotent reports below and in dispatch.py/reports.py.
A job's `kind` picks what its worker runs (the training or the compression
contract) and what its success registers; the rest is the same code.

A job moves `validating_files → queued → running → succeeded | failed | cancelled`
(and `paused`). Each dispatch to a GPU worker is an *attempt*; the attempt
number fences workers: only reports of the current attempt change the job, and
a worker whose attempt is no longer current stops at its next step (see
jobcontracts.training.Signal).
"""

from __future__ import annotations

from django.conf import settings
from django.db import models

from controlplane.core.ids import new_checkpoint_id, new_job_event_id, new_job_id
from controlplane.core.scoping import OrganizationOwned, OrganizationScopedManager


class JobStatus(models.TextChoices):
    VALIDATING_FILES = "validating_files"
    QUEUED = "queued"
    RUNNING = "running"
    PAUSED = "paused"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL = (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)


class JobKind(models.TextChoices):
    FINE_TUNING = "fine_tuning"
    COMPRESSION = "compression"
    EVALUATION = "evaluation"


class Job(OrganizationOwned):
    id = models.CharField(primary_key=True, max_length=40, default=new_job_id, editable=False)
    kind = models.CharField(max_length=16, choices=JobKind.choices, default=JobKind.FINE_TUNING)
    #: The base model trained on; for a compression job, the source's base model.
    base_model = models.ForeignKey(
        "modelregistry.BaseModel", on_delete=models.PROTECT, related_name="jobs"
    )
    #: Compression of one of the organization's own models (None: of `base_model` itself).
    source_model = models.ForeignKey(
        "modelregistry.CustomerModel",
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="+",
    )
    training_file = models.ForeignKey(
        "datasets.File", null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    validation_file = models.ForeignKey(
        "datasets.File", null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    #: Held-out test data, scored once at the end and never trained on (or, with none,
    #: `hyperparameters.test_fraction` of the training rows).
    test_file = models.ForeignKey(
        "datasets.File", null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    # May be a data partner's version the organization holds a grant for.
    dataset_version = models.ForeignKey(
        "datasets.DatasetVersion",
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="+",
    )
    data_format = models.CharField(max_length=32, blank=True)
    suffix = models.CharField(max_length=64, blank=True)
    seed = models.BigIntegerField()
    metadata = models.JSONField(default=dict, blank=True)
    task = models.CharField(max_length=32, default="causal_lm")
    method = models.CharField(max_length=16, default="supervised")
    #: Resolved hyperparameters ("auto" replaced by the value used); a compression job's
    #: resolved method options.
    hyperparameters = models.JSONField(default=dict)
    #: What the caller asked for, with "auto" kept: returned as OpenAI returns it.
    requested_hyperparameters = models.JSONField(default=dict)
    adapter = models.JSONField(null=True, blank=True)
    labels = models.JSONField(default=list, blank=True)
    gpus = models.PositiveSmallIntegerField(default=1)

    status = models.CharField(
        max_length=20, choices=JobStatus.choices, default=JobStatus.VALIDATING_FILES
    )
    error = models.JSONField(null=True, blank=True)
    #: Training tokens in one epoch, counted with the base model's tokenizer before the job runs.
    estimated_tokens = models.BigIntegerField(null=True, blank=True)
    estimated_price = models.DecimalField(max_digits=14, decimal_places=6, null=True, blank=True)
    #: How long the job should run once started, estimated before it is queued.
    estimated_seconds = models.PositiveIntegerField(null=True, blank=True)
    #: Tokens actually trained on; set once, when the job succeeds, whatever the attempts.
    trained_tokens = models.BigIntegerField(null=True, blank=True)
    #: The model the job made (a fine-tuned or a compressed model id).
    fine_tuned_model = models.CharField(max_length=300, blank=True)
    #: The final model's metrics on the validation set and on the held-out test set
    #: (jobcontracts.training's `valid_…` and `test_…` names), stored when the job succeeds.
    validation_metrics = models.JSONField(null=True, blank=True)
    test_metrics = models.JSONField(null=True, blank=True)
    #: A compression job's before/after report (jobcontracts.compression), stored once.
    report = models.JSONField(null=True, blank=True)

    attempt = models.PositiveIntegerField(default=0, help_text="Dispatches so far.")
    lost_attempts = models.PositiveIntegerField(
        default=0, help_text="Attempts whose worker died or failed unexpectedly."
    )
    #: The attempt in flight was sent to the broker (a queued job holding a concurrency slot).
    dispatched_at = models.DateTimeField(null=True, blank=True)
    lease_expires_at = models.DateTimeField(null=True, blank=True)
    signal_action = models.CharField(max_length=8, default="run")
    current_step = models.PositiveIntegerField(default=0)
    total_steps = models.PositiveIntegerField(null=True, blank=True)
    last_checkpoint_uri = models.CharField(max_length=600, blank=True)
    last_checkpoint_step = models.PositiveIntegerField(default=0)

    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    #: The custom engagement staff launched this job for (engagements sits above jobs: an id,
    #: no foreign key). Such a job is billed to the engagement and hidden from the customer.
    engagement_id = models.CharField(  # noqa: DJ001
        max_length=40, null=True, blank=True, db_index=True
    )
    created_at = models.DateTimeField(auto_now_add=True)
    queued_at = models.DateTimeField(null=True, blank=True)
    started_at = models.DateTimeField(null=True, blank=True)
    first_step_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    updated_at = models.DateTimeField(auto_now=True)

    objects = OrganizationScopedManager["Job"]()

    class Meta(OrganizationOwned.Meta):
        indexes = [
            models.Index(fields=["organization", "kind", "-id"]),
            models.Index(fields=["status", "queued_at"]),
        ]

    def __str__(self) -> str:
        return f"{self.pk} ({self.status})"

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL


class EventLevel(models.TextChoices):
    INFO = "info"
    WARN = "warn"
    ERROR = "error"


class JobEvent(OrganizationOwned):
    """What happened to a job, in OpenAI's event shape. Events made from a worker report
    carry its `(attempt, seq)`: the unique constraint makes applying a report idempotent."""

    id = models.CharField(primary_key=True, max_length=40, default=new_job_event_id, editable=False)
    job = models.ForeignKey(Job, on_delete=models.CASCADE, related_name="events")
    level = models.CharField(max_length=8, choices=EventLevel.choices, default=EventLevel.INFO)
    type = models.CharField(max_length=16, default="message")  # message | metrics
    message = models.TextField()
    data = models.JSONField(null=True, blank=True)
    attempt = models.PositiveIntegerField(null=True, blank=True)
    seq = models.PositiveIntegerField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    objects = OrganizationScopedManager["JobEvent"]()

    class Meta(OrganizationOwned.Meta):
        constraints = [
            models.UniqueConstraint(fields=["job", "attempt", "seq"], name="one_event_per_report")
        ]
        indexes = [models.Index(fields=["job", "-id"])]


class JobCheckpoint(OrganizationOwned):
    id = models.CharField(
        primary_key=True, max_length=40, default=new_checkpoint_id, editable=False
    )
    job = models.ForeignKey(Job, on_delete=models.CASCADE, related_name="checkpoints")
    step_number = models.PositiveIntegerField()
    metrics = models.JSONField(default=dict)
    uri = models.CharField(max_length=600)
    fine_tuned_model_checkpoint = models.CharField(max_length=300)
    created_at = models.DateTimeField(auto_now_add=True)

    objects = OrganizationScopedManager["JobCheckpoint"]()

    class Meta(OrganizationOwned.Meta):
        constraints = [
            models.UniqueConstraint(fields=["job", "step_number"], name="one_checkpoint_per_step")
        ]
