"""Base models (the platform's catalogue) and customer models (what fine-tuning produced).

A base model is global: every organization may list it and train on it. A
customer model belongs to one organization and is named as OpenAI names
fine-tuned models, `ft:{base}:{org-slug}:{suffix}:{job_id}`, with
`:ckpt-step-{n}` appended for a checkpoint (and `ft:{base}:{org-slug}:{suffix}:compressed:{job_id}`
for what a compression job made). Weights are never stored in the
database: `uri` points at a Hugging Face-format directory in object storage
(`s3://bucket/key` or `file:///path`), holding safetensors only.
"""

from __future__ import annotations

import re
from typing import Final

from django.db import models

from controlplane.core.ids import new_id
from controlplane.core.scoping import OrganizationOwned, OrganizationScopedManager

TASKS: Final = ("causal_lm", "classification", "embeddings")
METHODS: Final = ("supervised", "dpo")
ADAPTERS: Final = ("lora", "full")

#: Who owns base models in OpenAI's `owned_by`.
PLATFORM_OWNER: Final = "atelier"

#: A base model's public name: no colons (they separate the parts of customer model
#: ids) and no slashes (it is a URL path segment).
BASE_NAME_RE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class BaseModel(models.Model):
    """A model every organization can fine-tune; its id is its public name."""

    id = models.CharField(primary_key=True, max_length=64)
    family = models.CharField(max_length=32, help_text="gpt2, llama, bert, qwen, mistral, …")
    tasks = models.JSONField(default=list, help_text=f"Some of {', '.join(TASKS)}.")
    methods = models.JSONField(default=list, help_text=f"Some of {', '.join(METHODS)}.")
    adapters = models.JSONField(default=list, help_text=f"Some of {', '.join(ADAPTERS)}.")
    context_length = models.PositiveIntegerField()
    uri = models.CharField(
        max_length=1000, help_text="The Hugging Face-format directory: s3://bucket/key or file:///…"
    )
    price_per_1k_training_tokens = models.DecimalField(max_digits=12, decimal_places=6)
    description = models.TextField(blank=True)
    is_active = models.BooleanField(
        default=True, help_text="Inactive models are hidden and cannot be chosen for new jobs."
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["id"]

    def __str__(self) -> str:
        return self.id

    @property
    def owned_by(self) -> str:
        return PLATFORM_OWNER


class ModelKind(models.TextChoices):
    FINAL = "final"
    CHECKPOINT = "checkpoint"
    #: What a compression job made: `ft:{base}:{org}:{suffix}:compressed:{job_id}`.
    COMPRESSED = "compressed"


class ArtifactKind(models.TextChoices):
    FULL = "full"
    LORA = "lora"


class CustomerModel(OrganizationOwned):
    """A fine-tuned model (or one of its checkpoints) owned by one organization."""

    id = models.CharField(primary_key=True, max_length=300, editable=False)
    base = models.ForeignKey(BaseModel, on_delete=models.PROTECT, related_name="customer_models")
    job_id = models.CharField(max_length=40, db_index=True)
    suffix = models.CharField(max_length=64, blank=True)
    kind = models.CharField(max_length=16, choices=ModelKind.choices)
    step = models.PositiveIntegerField(null=True, blank=True)
    uri = models.CharField(max_length=1000, help_text="Prefix URI of the artifact directory.")
    artifact_kind = models.CharField(max_length=8, choices=ArtifactKind.choices)
    task = models.CharField(max_length=32)
    labels = models.JSONField(default=list, blank=True)
    version = models.PositiveIntegerField(
        default=1, help_text="1 + earlier final models of this organization, base and suffix."
    )
    #: How a compressed model was made: {"method", "source", "weights"?, ...}; None otherwise.
    compression = models.JSONField(null=True, blank=True)
    #: Made by a job of a custom engagement: hidden from the organization (not listed, not
    #: callable, not auto-deployed) until staff deliver it (`delivered_at`).
    engagement_id = models.CharField(  # noqa: DJ001
        max_length=40, null=True, blank=True, db_index=True
    )
    delivered_at = models.DateTimeField(null=True, blank=True)
    #: The model card's free text, set by the organization's owners and admins
    #: (`PATCH /v1/models/{id}/card`, at most `cards.CARD_TEXT_MAX` characters each).
    intended_use = models.TextField(blank=True)
    limitations = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    deleted_at = models.DateTimeField(null=True, blank=True)

    objects = OrganizationScopedManager["CustomerModel"]()

    class Meta(OrganizationOwned.Meta):
        indexes = [
            models.Index(fields=["organization", "base", "suffix", "kind"], name="cmodel_versions")
        ]

    def __str__(self) -> str:
        return self.id

    @property
    def owned_by(self) -> str:
        return str(self.organization_id)

    @property
    def quantized(self) -> bool:
        """Its weights are quantized (int8, fp8, bf16): it can be served, not pruned or
        distilled again (those train, and train on full-precision weights)."""
        return isinstance(self.compression, dict) and self.compression.get("method") == "quantize"

    @property
    def hidden(self) -> bool:
        """An engagement's model not delivered yet: its organization cannot see it."""
        return bool(self.engagement_id) and self.delivered_at is None


def new_estimate_id() -> str:
    return new_id("fest")


class EstimateStatus(models.TextChoices):
    IN_PROGRESS = "in_progress"
    COMPLETED = "completed"
    FAILED = "failed"


class FileEstimate(OrganizationOwned):
    """A file's pre-job report for one base model and sequence limit (`/v1/files/{id}/validate`).

    Token counts depend on the model's tokenizer and the sequence limit, not on
    the number of epochs (the price is the trained tokens times the epochs), so
    one row serves every `n_epochs`. Files and base models never change, so a
    completed row never goes stale.
    """

    id = models.CharField(primary_key=True, max_length=40, default=new_estimate_id, editable=False)
    file = models.ForeignKey("datasets.File", on_delete=models.CASCADE, related_name="+")
    base = models.ForeignKey(BaseModel, on_delete=models.CASCADE, related_name="+")
    max_seq_len = models.PositiveIntegerField(null=True, blank=True)
    status = models.CharField(
        max_length=16, choices=EstimateStatus.choices, default=EstimateStatus.IN_PROGRESS
    )
    #: Token statistics (`tokens.TokenStats.to_dict()`) and duplicate counts.
    result = models.JSONField(null=True, blank=True)
    error = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    #: When the current computation was started or sent to the `control` queue.
    started_at = models.DateTimeField()
    finished_at = models.DateTimeField(null=True, blank=True)

    objects = OrganizationScopedManager["FileEstimate"]()

    class Meta(OrganizationOwned.Meta):
        constraints = [
            # A NULL max_seq_len (the model's own limit) is one more value here, not
            # distinct from every other NULL: the second constraint covers it.
            models.UniqueConstraint(
                fields=["file", "base", "max_seq_len"], name="one_estimate_per_limit"
            ),
            models.UniqueConstraint(
                fields=["file", "base"],
                condition=models.Q(max_seq_len__isnull=True),
                name="one_estimate_per_model",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.file_id} on {self.base_id} ({self.status})"
