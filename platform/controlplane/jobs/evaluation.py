"""Evaluations: score one or more models the caller may use on one of their files.

An evaluation is a `Job` of kind `evaluation`: dispatched, leased, fenced, fair-queued,
cancelled, retried and reported exactly as the other kinds are (dispatch.py, reports.py).
What differs is here: the request and its checks, the spec the worker gets
(jobcontracts.evaluation), and what success makes: the per-model metrics (a side-by-side
table when several models are scored), a results File the caller downloads through the
Files API, and the tokens each model read, billed as inference prompt tokens.

The job's columns, reused: `test_file` is the file scored, `base_model` the first model's
base, `hyperparameters` holds `models` (ids, in the table's order) and the batch options,
and `report` the metrics, rows and results file once it succeeds.
"""

from __future__ import annotations

import hashlib
import secrets
from typing import Any, Final

import structlog
from django.conf import settings
from django.core.files.storage import default_storage
from django.utils import timezone
from rest_framework import serializers

from controlplane.billing.ledger import ledger_append
from controlplane.billing.models import Meter
from controlplane.core.errors import ApiError, NotFound
from controlplane.core.ids import new_id
from controlplane.core.serializers import StrictInputSerializer, unix
from controlplane.datasets.models import File, FileStatus
from controlplane.datasets.storage import object_uri
from controlplane.datasets.validation import OTHER_LABEL
from controlplane.modelregistry.models import BaseModel, CustomerModel
from controlplane.modelregistry.selectors import model_for_organization
from controlplane.tenancy.models import Organization
from jobcontracts import evaluation as contract
from jobcontracts.compression import SourceRef
from jobcontracts.training import DataRef

from .events import event_add
from .files import data_summary, training_file_get
from .models import Job, JobKind, JobStatus
from .params import METADATA_VALUE_MAX, metadata_checked

log = structlog.get_logger(__name__)

#: File formats an evaluation scores, and the kind of model each is scored on.
TASK_OF_FORMAT: Final = {
    **dict.fromkeys(contract.LM_FORMATS, "causal_lm"),
    "preference": "causal_lm",
    "classification": "classification",
}
MAX_SEQ_LEN: Final = 2048


def new_evaluation_job_id() -> str:
    return new_id("evaljob").replace("evaljob_", "evaljob-", 1)


class CreateEvaluationInput(StrictInputSerializer):
    model = serializers.CharField(
        max_length=300, required=False, help_text="One model to score (or give `models`)."
    )
    models = serializers.ListField(
        child=serializers.CharField(max_length=300),
        min_length=1,
        max_length=contract.MAX_MODELS,
        required=False,
        help_text="Models to score side by side on the same file (base, fine-tuned, compressed).",
    )
    file = serializers.CharField(
        max_length=64,
        help_text=(
            "A validated fine-tune file: chat, prompt_completion or text rows (loss, "
            "perplexity), classification rows (accuracy, macro-F1) or preference rows "
            "(preference accuracy)."
        ),
    )
    batch_size = serializers.IntegerField(min_value=1, max_value=256, default=8)
    metadata = serializers.DictField(
        child=serializers.CharField(max_length=METADATA_VALUE_MAX, allow_blank=True),
        required=False,
    )

    def validate_metadata(self, value: dict[str, str]) -> dict[str, str]:
        return metadata_checked(value)

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        if ("model" in attrs) == ("models" in attrs):
            raise serializers.ValidationError(
                {"models": ["Give 'model' (one id) or 'models' (a list of ids)."]}
            )
        names = attrs.pop("models", None) or [attrs.pop("model")]
        if len(set(names)) != len(names):
            raise serializers.ValidationError({"models": ["Give each model once."]})
        attrs["models"] = names
        return attrs


def _model(organization: Organization, model_id: str) -> BaseModel | CustomerModel:
    try:
        return model_for_organization(organization=organization, model_id=model_id)
    except NotFound as error:
        raise NotFound(str(error.detail), param="models", code="model_not_found") from None


def _task_of(model: BaseModel | CustomerModel) -> str | None:
    if isinstance(model, CustomerModel):
        return model.task
    return "causal_lm" if "causal_lm" in model.tasks else None


def _check(
    model: BaseModel | CustomerModel, *, task: str, data_format: str, labels: list[str]
) -> None:
    have = _task_of(model)
    if have != task:
        raise ApiError(
            f"A {data_format} file is scored on {task} models; '{model.pk}' is "
            f"{'a ' + have + ' model' if have else 'not one'}.",
            param="models",
            code="unsupported_model",
        )
    if task == "classification":
        assert isinstance(model, CustomerModel)
        unknown = sorted(set(labels) - set(model.labels))
        if OTHER_LABEL in labels or unknown:
            raise ApiError(
                f"The file has labels the classifier '{model.pk}' does not know: "
                f"{', '.join(unknown[:5]) or 'more than 1000'}.",
                param="file",
                code="invalid_file",
            )


def job_build(*, organization: Organization, user_id: str | None, data: dict[str, Any]) -> Job:
    """Check everything the caller can get wrong, then create the job queued (runs in
    `services.evaluation_job_create`'s transaction, which dispatches it on commit)."""
    models = [_model(organization, name) for name in data["models"]]
    file = training_file_get(organization, data["file"], "file")
    data_format, rows, labels = data_summary(file)
    if rows < 1:
        raise ApiError(f"The file '{file.pk}' has no rows.", param="file", code="empty_file")
    task = TASK_OF_FORMAT.get(data_format)
    if task is None:
        raise ApiError(
            f"A '{data_format}' file cannot be scored; give chat, prompt_completion, text, "
            "classification or preference rows.",
            param="file",
            code="invalid_file",
        )
    for model in models:
        _check(model, task=task, data_format=data_format, labels=labels)
    first = models[0]
    job = Job.objects.create(
        id=new_evaluation_job_id(),
        kind=JobKind.EVALUATION,
        organization=organization,
        base_model=first.base if isinstance(first, CustomerModel) else first,
        source_model=first if isinstance(first, CustomerModel) else None,
        test_file=file,
        data_format=data_format,
        seed=secrets.randbelow(2**31),
        metadata=data.get("metadata") or {},
        task=task,
        method="evaluate",
        hyperparameters={"models": [m.pk for m in models], "batch_size": data["batch_size"]},
        requested_hyperparameters={"batch_size": data["batch_size"]},
        labels=list(first.labels) if isinstance(first, CustomerModel) else [],
        status=JobStatus.QUEUED,
        queued_at=timezone.now(),
        created_by_id=user_id,
    )
    names = ", ".join(m.pk for m in models)
    event_add(job, f"Created evaluation: {job.pk} ({names} on {file.pk}, {rows} rows)")
    event_add(job, "Evaluation queued")
    log.info("jobs.evaluation_created", job_id=job.pk, organization_id=organization.pk)
    return job


def retry_request(job: Job) -> dict[str, Any]:
    return {
        "file": job.test_file_id,
        "models": list(job.hyperparameters["models"]),
        "batch_size": int(job.hyperparameters.get("batch_size") or 8),
        "metadata": dict(job.metadata or {}),
    }


# --- dispatch and success (called by dispatch.py and reports.py) ----------------------------


def _ref(model: BaseModel | CustomerModel) -> SourceRef:
    if isinstance(model, BaseModel):
        return SourceRef(name=model.pk, uri=model.uri, family=model.family)
    base = model.base
    if model.artifact_kind == "lora":
        return SourceRef(
            name=model.pk,
            uri=base.uri,
            family=base.family,
            adapter_uri=model.uri,
            labels=tuple(model.labels),
        )
    return SourceRef(name=model.pk, uri=model.uri, family=base.family, labels=tuple(model.labels))


def models_of(job: Job) -> list[BaseModel | CustomerModel]:
    """The job's models as they are now: one deleted since is a `model_not_found`."""
    return [_model(job.organization, name) for name in job.hyperparameters["models"]]


def build_spec(job: Job, *, output_uri: str, control_uri: str) -> contract.EvaluationSpec:
    """The worker's spec, with each model as it is now (`models_of`)."""
    assert job.test_file is not None
    models = models_of(job)
    context = min(
        [MAX_SEQ_LEN]
        + [(m.base if isinstance(m, CustomerModel) else m).context_length for m in models]
    )
    return contract.EvaluationSpec(
        job_id=job.pk,
        attempt=job.attempt,
        organization_id=job.organization_id,
        task=job.task,
        models=tuple(_ref(m) for m in models),
        data=DataRef(uri=object_uri(job.test_file.storage_name), format=job.data_format),
        output_uri=output_uri,
        control_uri=control_uri,
        batch_size=int(job.hyperparameters.get("batch_size") or 8),
        max_seq_len=context,
        heartbeat_seconds=settings.JOBS_HEARTBEAT_SECONDS,
    )


def evaluation_succeeded(job: Job, d: dict[str, Any], *, prefix: str) -> None:
    """Store the metrics, make the results a File of the caller's, bill the tokens once.
    `d["artifact_uri"]` is under the job's storage `prefix` (reports.py refuses others)."""
    if job.report is not None:
        return
    name = prefix + str(d["artifact_uri"])[len(object_uri(prefix)) :]
    digest = hashlib.sha256()
    size = 0
    with default_storage.open(name, "rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
            size += len(chunk)
    rows = int(d.get("rows") or 0)
    output = File.objects.create(
        organization_id=job.organization_id,
        filename=f"{job.pk}-results.jsonl",
        purpose="evals",
        bytes=size,
        sha256=digest.hexdigest(),
        storage_name=name,
        status=FileStatus.PROCESSED,
        validation={"format": "evaluation_results", "rows": rows},
        created_by_id=job.created_by_id,
    )
    names = list(job.hyperparameters["models"])
    metrics = d.get("metrics") if isinstance(d.get("metrics"), dict) else {}
    tokens = d.get("tokens") if isinstance(d.get("tokens"), dict) else {}
    assert isinstance(metrics, dict)
    assert isinstance(tokens, dict)
    job.report = {
        "rows": rows,
        "metrics": {n: metrics.get(n) for n in names},
        "tokens": {n: int(tokens.get(n) or 0) for n in names},
        "output_file_id": output.pk,
    }
    job.trained_tokens = sum(job.report["tokens"].values())
    now = timezone.now()
    for index, model in enumerate(names):
        # The tokens each model read, as its inference prompt tokens (priced per model).
        ledger_append(
            organization_id=job.organization_id,
            idempotency_key=f"evaluation:{job.pk}:{index}",
            meter=Meter.PROMPT_TOKENS,
            quantity=job.report["tokens"][model],
            occurred_at=now,
            source="jobs.evaluation",
            model=model,
            reference=job.pk,
            engagement_id=job.engagement_id,
        )


def evaluation_out(job: Job) -> dict[str, Any]:
    report = job.report or {}
    names = list(job.hyperparameters.get("models") or [])
    metrics = report.get("metrics") or {}
    return {
        "id": job.pk,
        "object": "evaluation",
        "created_at": unix(job.created_at),
        "status": job.status,
        "error": job.error,
        "file": job.test_file_id,
        "format": job.data_format,
        "models": names,
        "metrics": metrics or None,
        # One row per model, in the order asked: the side-by-side table.
        "table": [{"model": n, **(metrics.get(n) or {})} for n in names] if metrics else None,
        "rows": report.get("rows"),
        "usage": {"prompt_tokens": job.trained_tokens} if job.trained_tokens is not None else None,
        "output_file_id": report.get("output_file_id"),
        "metadata": job.metadata or None,
        "organization_id": job.organization_id,
        "started_at": unix(job.started_at),
        "finished_at": unix(job.finished_at),
        "progress": {"step": job.current_step, "total_steps": job.total_steps},
        "attempt": job.attempt,
    }
