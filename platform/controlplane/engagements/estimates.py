"""What a job would cost an engagement's budget, computed before the job is created.

Tokens and price are what the jobs app itself computes: for fine-tuning, the training
tokens counted with the base model's tokenizer and priced by `training_price`, exactly as
`jobs.services.job_prepare` does later (a control task); for compression,
`jobs.compression.estimate`. GPU-seconds are the job's expected run time times its GPUs:
compression's own ETA, and for fine-tuning the same rule compression uses for its training
methods (6 x parameters x tokens floating-point operations at `JOBS_COMPRESSION_FLOPS`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from django.conf import settings

from controlplane.core.errors import ApiError
from controlplane.datasets.models import DatasetVersion, File
from controlplane.jobs import compression, params
from controlplane.jobs.dispatch import MAX_SEQ_LEN
from controlplane.jobs.files import data_summary, training_file_get, training_version_get
from controlplane.jobs.models import Job, JobKind
from controlplane.modelregistry import artifacts
from controlplane.modelregistry.models import BaseModel
from controlplane.modelregistry.selectors import model_for_organization
from controlplane.modelregistry.tokens import count_dataset_tokens, training_price
from controlplane.tenancy.models import Organization


@dataclass(frozen=True)
class Estimate:
    tokens: int
    gpu_seconds: int
    amount: Decimal

    def __add__(self, other: Estimate) -> Estimate:
        return Estimate(
            self.tokens + other.tokens,
            self.gpu_seconds + other.gpu_seconds,
            self.amount + other.amount,
        )


NOTHING = Estimate(0, 0, Decimal(0))


def _parameters(uri: str) -> int:
    try:
        return artifacts.model_shape(uri).parameters or 0
    except (OSError, ValueError):
        return 0


def training_seconds(*, parameters: int, tokens: int) -> int:
    return math.ceil(30 + 6 * parameters * tokens / float(settings.JOBS_COMPRESSION_FLOPS))


def compression_tokens(options: dict[str, Any]) -> int:
    """Tokens a compression job trains on (prune's recovery, distillation); 0 for quantize."""
    steps = int(options.get("recovery_steps") or options.get("steps") or 0)
    return steps * int(options.get("batch_size") or 8) * int(options.get("max_seq_len") or 128)


def fine_tuning_estimate(*, organization: Organization, data: dict[str, Any]) -> Estimate:
    """`data` as `jobs.params.CreateJobInput` validated it."""
    base = model_for_organization(organization=organization, model_id=data["model"])
    if not isinstance(base, BaseModel):
        raise ApiError(
            f"'{data['model']}' is a fine-tuned model; fine-tune from its base model "
            f"'{base.base_id}' instead.",
            param="model",
            code="model_not_supported",
        )
    source: File | DatasetVersion
    if "training_file" in data:
        source = training_file_get(organization, data["training_file"], "training_file")
    else:
        source = training_version_get(organization, data["dataset"])
    data_format, rows, _ = data_summary(source)
    if rows < 1:
        raise ApiError("The training data has no rows.", param="training_file", code="empty_file")
    _, requested = params.requested_hyperparameters(data)
    adapter = (data.get("adapter") or {"type": "lora"})["type"]
    epochs = params.resolve(requested, rows=rows, adapter=adapter).n_epochs
    stats = count_dataset_tokens(
        base=base,
        storage_name=source.storage_name,
        format=data_format,
        max_seq_len=min(base.context_length, MAX_SEQ_LEN),
    )
    tokens = stats.trained_tokens * epochs
    seconds = training_seconds(parameters=_parameters(base.uri), tokens=tokens)
    return Estimate(
        tokens=tokens,
        gpu_seconds=seconds * int(data.get("gpus") or 1),
        amount=training_price(base=base, tokens=stats.trained_tokens, n_epochs=epochs),
    )


def compression_estimate(
    *, organization: Organization, data: dict[str, Any], engagement_id: str
) -> Estimate:
    """`data` as `jobs.compression.CreateCompressionJobInput` validated it. The options are
    completed as `compression.job_build` completes them (prune's default recovery)."""
    model = model_for_organization(
        organization=organization, model_id=data["model"], engagement_id=engagement_id
    )
    if isinstance(model, BaseModel):
        base, weights_uri = model, model.uri
    else:
        base = model.base
        weights_uri = model.uri if model.artifact_kind == "full" else base.uri
    options = dict(data["options"])
    has_rows = "training_file" in data or "dataset" in data
    if data["method"] == "prune":
        options.setdefault("recovery_steps", 60 if has_rows else 0)
    parameters = _parameters(weights_uri)
    price, seconds = compression.estimate(
        base=base, method=data["method"], options=options, parameters=parameters
    )
    return Estimate(tokens=compression_tokens(options), gpu_seconds=seconds, amount=price)


def job_estimate(job: Job) -> Estimate:
    """What a job created for an engagement was estimated to use (its stored estimate)."""
    if job.kind == JobKind.COMPRESSION:
        tokens = compression_tokens(job.hyperparameters or {})
    else:
        epochs = int((job.hyperparameters or {}).get("n_epochs") or 1)
        tokens = int(job.estimated_tokens or 0) * epochs
    return Estimate(
        tokens=tokens,
        gpu_seconds=int(job.estimated_seconds or 0) * int(job.gpus or 1),
        amount=job.estimated_price or Decimal(0),
    )
