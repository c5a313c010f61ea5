"""Fine-tuning jobs: create, prepare (token count and price), cancel, pause, resume.

Dispatch to GPU workers, fair scheduling and the lease reaper live in
dispatch.py; applying worker reports in reports.py.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import Any

import structlog
from django.db import transaction
from django.utils import timezone

from controlplane.core.errors import ApiError, Conflict
from controlplane.datasets.models import DatasetVersion, File
from controlplane.datasets.validation import OTHER_LABEL
from controlplane.modelregistry.models import BaseModel
from controlplane.modelregistry.selectors import model_for_organization
from controlplane.modelregistry.tokens import count_dataset_tokens, training_price
from controlplane.tenancy.models import Organization
from jobcontracts.training import held_out_count

from . import compression, dispatch, evaluation, params
from .events import event_add
from .files import data_summary, training_file_get, training_version_get
from .models import Job, JobKind, JobStatus

log = structlog.get_logger(__name__)


def _base_model(organization: Organization, model_id: str) -> BaseModel:
    model = model_for_organization(organization=organization, model_id=model_id)
    if not isinstance(model, BaseModel):
        raise ApiError(
            f"'{model_id}' is a fine-tuned model; fine-tune from its base model "
            f"'{model.base_id}' instead (continued training is not supported yet).",
            param="model",
            code="model_not_supported",
        )
    return model


def _check_capabilities(
    base: BaseModel, *, task: str, method: str, adapter: str, data_format: str, param: str
) -> None:
    if task not in base.tasks:
        raise ApiError(
            f"Base model '{base.pk}' does not support task '{task}' "
            f"(it supports: {', '.join(base.tasks)}).",
            param="task",
            code="unsupported_task",
        )
    if method not in base.methods:
        raise ApiError(
            f"Base model '{base.pk}' does not support method '{method}' "
            f"(it supports: {', '.join(base.methods)}).",
            param="method",
            code="unsupported_method",
        )
    if adapter not in base.adapters:
        raise ApiError(
            f"Base model '{base.pk}' cannot be fine-tuned with adapter '{adapter}' "
            f"(it supports: {', '.join(base.adapters)}).",
            param="adapter",
            code="unsupported_adapter",
        )
    allowed = params.FORMATS_FOR.get((task, method))
    if allowed is None:
        raise ApiError(
            f"Method '{method}' is not available for task '{task}'.",
            param="method",
            code="unsupported_method",
        )
    if data_format not in allowed:
        raise ApiError(
            f"A {task} job with method '{method}' trains on {' or '.join(allowed)} data; "
            f"this dataset is '{data_format}'.",
            param=param,
            code="invalid_training_file",
        )


def _held_out_file(organization: Organization, file_id: str, data_format: str) -> File:
    """The caller's validated fine-tune file, with rows, in the training data's format."""
    file = training_file_get(organization, file_id, "test_file")
    test_format, test_rows, _ = data_summary(file)
    if test_rows < 1:
        raise ApiError(
            f"The test file '{file_id}' has no rows.", param="test_file", code="empty_file"
        )
    if test_format != data_format:
        raise ApiError(
            f"The test file must have the same format as the training data ('{data_format}'); "
            f"'{file_id}' is '{test_format}'.",
            param="test_file",
            code="invalid_test_file",
        )
    return file


@transaction.atomic
def job_create(
    *,
    organization: Organization,
    user_id: str | None,
    data: dict[str, Any],
    engagement_id: str | None = None,
) -> Job:
    """Check everything a user can get wrong now, then create the job in
    `validating_files`; counting tokens and pricing happen in a control task.
    `engagement_id`: staff run it for a custom engagement (billed there, hidden from
    the organization's job lists)."""
    base = _base_model(organization, data["model"])
    source: File | DatasetVersion
    training_file = None
    version = None
    if "training_file" in data:
        training_file = source = training_file_get(
            organization, data["training_file"], "training_file"
        )
        source_param = "training_file"
    else:
        version = source = training_version_get(organization, data["dataset"])
        source_param = "dataset"
    data_format, rows, labels = data_summary(source)
    if rows < 1:
        raise ApiError("The training data has no rows.", param=source_param, code="empty_file")

    validation_file = None
    if data.get("validation_file"):
        validation_file = training_file_get(
            organization, data["validation_file"], "validation_file"
        )
        if data_summary(validation_file)[0] != data_format:
            raise ApiError(
                "The validation file must have the same format as the training data "
                f"('{data_format}').",
                param="validation_file",
                code="invalid_validation_file",
            )

    test_file = None
    if data.get("test_file"):
        test_file = _held_out_file(organization, data["test_file"], data_format)

    method, requested = params.requested_hyperparameters(data)
    test_fraction = requested.get("test_fraction")
    if test_fraction is not None:
        held_out = held_out_count(rows, test_fraction)
        if held_out < 1:
            raise ApiError(
                f"test_fraction {test_fraction} would leave no rows to train on: the training "
                f"data has {rows} row{'s' if rows != 1 else ''}. Upload more rows, or give a "
                "'test_file'.",
                param="hyperparameters.test_fraction",
                code="invalid_test_fraction",
            )
        rows -= held_out
    task = data["task"]
    adapter_in = data.get("adapter") or {"type": "lora"}
    adapter_kind = adapter_in["type"]
    _check_capabilities(
        base,
        task=task,
        method=method,
        adapter=adapter_kind,
        data_format=data_format,
        param=source_param,
    )
    if task == "classification":
        if OTHER_LABEL in labels or len(labels) < 2:
            raise ApiError(
                "A classification job needs between 2 and 1000 distinct labels; this data has "
                f"{'more than 1000' if OTHER_LABEL in labels else len(labels)}.",
                param=source_param,
                code="invalid_training_file",
            )
    else:
        labels = []
    if requested.get("packing") and (task != "causal_lm" or method != "supervised"):
        raise ApiError(
            f"Packing joins causal-LM rows for supervised training; this job is {method} {task}.",
            param="hyperparameters.packing",
            code="invalid_hyperparameter",
        )
    batching = {k: bool(requested[k]) for k in ("group_by_length", "packing") if k in requested}
    resolved = params.resolve(requested, rows=rows, adapter=adapter_kind)

    job = Job.objects.create(
        organization=organization,
        base_model=base,
        training_file=training_file,
        validation_file=validation_file,
        test_file=test_file,
        dataset_version=version,
        data_format=data_format,
        suffix=data.get("suffix") or "",
        seed=data["seed"] if data.get("seed") is not None else secrets.randbelow(2**31),
        metadata=data.get("metadata") or {},
        task=task,
        method=method,
        hyperparameters={
            **resolved.openai_shape(),
            "learning_rate": resolved.learning_rate,
            **({} if test_fraction is None else {"test_fraction": float(test_fraction)}),
            **batching,
        },
        requested_hyperparameters=requested,
        adapter=None if adapter_kind == "full" else {k: v for k, v in adapter_in.items()},
        labels=labels,
        gpus=data["gpus"],
        created_by_id=user_id,
        engagement_id=engagement_id,
    )
    event_add(job, f"Created fine-tuning job: {job.pk}")
    log.info("jobs.created", job_id=job.pk, organization_id=organization.pk, model=base.pk)
    dispatch.schedule_prepare(job)
    return job


@transaction.atomic
def compression_job_create(
    *,
    organization: Organization,
    user_id: str | None,
    data: dict[str, Any],
    engagement_id: str | None = None,
) -> Job:
    """A compression job, checked and queued (compression.job_build); nothing is stored or
    queued when a check fails."""
    job = compression.job_build(
        organization=organization, user_id=user_id, data=data, engagement_id=engagement_id
    )
    dispatch.schedule_dispatch()
    return job


@transaction.atomic
def evaluation_job_create(
    *, organization: Organization, user_id: str | None, data: dict[str, Any]
) -> Job:
    """An evaluation, checked and queued (evaluation.job_build); nothing is stored or queued
    when a check fails."""
    job = evaluation.job_build(organization=organization, user_id=user_id, data=data)
    dispatch.schedule_dispatch()
    return job


def job_prepare(*, job_id: str) -> Job:
    """Count the training tokens with the base model's tokenizer, price the job, queue it.
    Safe to run twice: only a job still `validating_files` is touched."""
    job = Job.objects.dangerously_unscoped().select_related("base_model").get(pk=job_id)
    if job.status != JobStatus.VALIDATING_FILES:
        return job
    storage_name = (
        job.training_file.storage_name if job.training_file else job.dataset_version.storage_name  # type: ignore[union-attr]
    )
    max_len = min(job.base_model.context_length, dispatch.MAX_SEQ_LEN)
    stats = count_dataset_tokens(
        base=job.base_model, storage_name=storage_name, format=job.data_format, max_seq_len=max_len
    )
    with transaction.atomic():
        job = Job.objects.locked(job)
        if job.status != JobStatus.VALIDATING_FILES:
            return job
        epochs = int(job.hyperparameters["n_epochs"])
        # What training sees: each sequence cut to the job's max_seq_len.
        trained = stats.trained_tokens
        fraction = job.hyperparameters.get("test_fraction")
        if fraction and stats.rows:
            # The held-out rows are not trained on (nor billed): estimated pro rata.
            kept = stats.rows - held_out_count(stats.rows, float(fraction))
            trained = round(trained * kept / stats.rows)
        job.estimated_tokens = trained
        job.estimated_price = training_price(base=job.base_model, tokens=trained, n_epochs=epochs)
        job.status = JobStatus.QUEUED
        job.queued_at = timezone.now()
        job.save()
        event_add(
            job,
            f"Files validated: {stats.rows} rows, {trained} training tokens "
            f"per epoch; estimated price for {epochs} epochs: {job.estimated_price}",
            data={
                "rows": stats.rows,
                "tokens_per_epoch": trained,
                "n_epochs": epochs,
                "estimated_price": str(job.estimated_price),
            },
        )
        event_add(job, "Fine-tuning job queued")
        dispatch.schedule_dispatch()
    return job


def _label(job: Job) -> str:
    return {JobKind.COMPRESSION: "Compression job", JobKind.EVALUATION: "Evaluation"}.get(
        JobKind(job.kind), "Fine-tuning job"
    )


@transaction.atomic
def job_cancel(*, job: Job) -> Job:
    job = Job.objects.locked(job)
    if job.is_terminal:
        raise Conflict(
            f"Job '{job.pk}' has already {job.status}; only an unfinished job can be cancelled.",
            code="job_not_cancellable",
        )
    in_flight = job.dispatched_at is not None
    job.status = JobStatus.CANCELLED
    job.finished_at = timezone.now()
    job.lease_expires_at = None
    job.save()
    event_add(job, f"{_label(job)} cancelled by request")
    if in_flight:
        dispatch.signal(job, "cancel")
    dispatch.schedule_dispatch()
    return job


@transaction.atomic
def job_pause(*, job: Job) -> Job:
    """Pause at the next step boundary; the worker checkpoints so resume loses nothing."""
    job = Job.objects.locked(job)
    if job.status not in (JobStatus.QUEUED, JobStatus.RUNNING):
        raise Conflict(
            f"Job '{job.pk}' is {job.status}; only a queued or running job can be paused.",
            code="job_not_pausable",
        )
    in_flight = job.dispatched_at is not None
    job.status = JobStatus.PAUSED
    # In flight, `dispatched_at` stays set until the worker reports its pause checkpoint
    # (or its lease runs out): the job keeps its concurrency slot until then.
    job.save()
    event_add(job, "Fine-tuning job pausing" if in_flight else "Fine-tuning job paused")
    if in_flight:
        dispatch.signal(job, "pause")
    dispatch.schedule_dispatch()
    return job


@transaction.atomic
def job_resume(*, job: Job) -> Job:
    job = Job.objects.locked(job)
    if job.status != JobStatus.PAUSED:
        raise Conflict(
            f"Job '{job.pk}' is {job.status}; only a paused job can be resumed.",
            code="job_not_paused",
        )
    if job.dispatched_at is not None:
        raise Conflict(
            f"Job '{job.pk}' is still pausing: its worker is writing a checkpoint. "
            "Retry in a few seconds.",
            code="job_pausing",
        )
    job.status = JobStatus.QUEUED
    job.save()
    where = f" from step {job.last_checkpoint_step}" if job.last_checkpoint_uri else ""
    event_add(job, f"Fine-tuning job resumed{where}")
    dispatch.schedule_dispatch()
    return job


def _retry_request(job: Job) -> dict[str, Any]:
    """The create request that makes a job with `job`'s inputs (the validated shape the
    create services take), so a retry passes every check a new job passes, against the
    data as it is now (a file deleted or a partner's grant revoked since is refused)."""
    data: dict[str, Any] = {
        "seed": job.seed,
        "suffix": job.suffix,
        "metadata": dict(job.metadata or {}),
        "task": job.task,
    }
    if job.training_file_id:
        data["training_file"] = job.training_file_id
    elif job.dataset_version_id:
        data["dataset"] = job.dataset_version_id
    if job.validation_file_id:
        data["validation_file"] = job.validation_file_id
    if job.test_file_id:
        data["test_file"] = job.test_file_id
    if job.kind == JobKind.COMPRESSION:
        data["model"] = job.source_model_id or job.base_model_id
        data["method"] = job.method
        data["options"] = dict(job.requested_hyperparameters)
    else:
        data["model"] = job.base_model_id
        data["method"] = {
            "type": job.method,
            job.method: {"hyperparameters": dict(job.requested_hyperparameters)},
        }
        data["adapter"] = job.adapter if job.adapter is not None else {"type": "full"}
        data["gpus"] = job.gpus
    return data


#: Checks an upper app registers in its AppConfig.ready() to run before a job is retried,
#: inside the retry's transaction; each raises an ApiError to refuse. The engagements app
#: checks an engagement's job against the engagement's budget and status.
_retry_checks: list[Callable[[Job], None]] = []


def retry_check_register(check: Callable[[Job], None]) -> None:
    if check not in _retry_checks:
        _retry_checks.append(check)


@transaction.atomic
def job_retry(*, job: Job) -> Job:
    """Run a failed or cancelled job again, as a new job with the same inputs (files,
    dataset, model, method, hyperparameters as asked, seed, suffix, metadata).

    A new job rather than the old one re-queued: the failed job, its events, attempts
    and error stay as they were (what support and the customer read), the new job is
    checked, priced and billed on its own, and each names the other in an event.
    """
    job = Job.objects.locked(job)
    if job.status not in (JobStatus.FAILED, JobStatus.CANCELLED):
        raise Conflict(
            f"Job '{job.pk}' is {job.status}; only a failed or cancelled job can be retried.",
            code="job_not_retryable",
        )
    for check in _retry_checks:
        check(job)
    organization = Organization.objects.get(pk=job.organization_id)
    if job.kind == JobKind.EVALUATION:
        retry = evaluation_job_create(
            organization=organization,
            user_id=job.created_by_id,
            data=evaluation.retry_request(job),
        )
    else:
        create = compression_job_create if job.kind == JobKind.COMPRESSION else job_create
        retry = create(
            organization=organization,
            user_id=job.created_by_id,
            data=_retry_request(job),
            engagement_id=job.engagement_id,
        )
    event_add(job, f"{_label(job)} retried as {retry.pk}", data={"retried_as": retry.pk})
    event_add(retry, f"{_label(retry)} retrying {job.pk}", data={"retry_of": job.pk})
    log.info("jobs.retried", job_id=job.pk, retry_id=retry.pk, organization_id=organization.pk)
    return retry
