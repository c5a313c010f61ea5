"""Applying GPU workers' reports to jobs: idempotent, fenced by attempt, order-tolerant.

Each report is identified by `(job_id, attempt, seq)`. Reports that leave a
trace are stored as a JobEvent under that key (unique), so a report delivered
twice changes nothing the second time. Reports of an attempt that is no longer
the job's current one (a worker presumed dead that was not) are ignored.

A report's storage URIs (checkpoints, the final artifact) must lie under the
job's own prefix, the `output_uri` its spec gave the worker: they become model
artifacts that are served and resumed from, so a URI naming another
organization's objects, another bucket or scheme, or climbing out with `..` is
refused (recorded as a warning event, not applied).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any
from urllib.parse import unquote, urlsplit

import structlog
from django.db import IntegrityError, transaction
from django.utils import timezone

from controlplane.billing import meters
from controlplane.datasets import catalog
from controlplane.datasets.storage import object_uri
from controlplane.modelregistry.services import customer_model_register
from jobcontracts import training as contract

from . import compression, dispatch, evaluation
from .events import event_add, job_fail
from .models import EventLevel, Job, JobCheckpoint, JobKind, JobStatus
from .signals import job_succeeded

log = structlog.get_logger(__name__)


def _message(report: contract.Report, job: Job) -> tuple[str, str, str, Any]:
    """(level, type, message, data) of the event a report leaves."""
    d = report.data
    kind = report.kind
    if job.kind == JobKind.EVALUATION and kind in (
        contract.STARTED,
        contract.PROGRESS,
        contract.SUCCEEDED,
        contract.CANCELLED,
    ):
        return _evaluation_message(report, job)
    if kind == contract.STARTED and job.kind == JobKind.COMPRESSION:
        return (
            "info",
            "message",
            f"Compression ({job.method}) started on "
            f"{d.get('device', 'a worker')} (attempt {report.attempt})",
            d,
        )
    if kind == contract.PROGRESS and job.kind == JobKind.COMPRESSION:
        loss = d.get("train_loss")
        phase = str(d.get("phase") or "training").capitalize()
        text = f"{phase} step {d.get('step')}/{d.get('total_steps')}"
        if loss is not None:
            text += f": loss={float(loss):.4f}"
        return "info", "metrics", text, d
    if kind == contract.CANCELLED and job.kind == JobKind.COMPRESSION:
        return "info", "message", "Compression stopped (cancelled); no model was made", d
    if kind == contract.STARTED:
        resumed = d.get("resumed_from_step") or 0
        where = f", resuming from step {resumed}" if resumed else ""
        return (
            "info",
            "message",
            f"Training started on {d.get('device', 'a worker')} "
            f"(attempt {report.attempt}, {d.get('total_steps')} steps{where})",
            d,
        )
    if kind == contract.PROGRESS:
        loss = d.get("train_loss")
        text = f"Step {d.get('step')}/{d.get('total_steps')}"
        if loss is not None:
            text += f": training loss={float(loss):.4f}"
        return "info", "metrics", text, d
    if kind == contract.METRICS:
        if any(k.startswith("test_") for k in d):
            parts = [f"{k}={float(v):.4f}" for k, v in d.items() if k.startswith("test_")]
            return "info", "metrics", "Held-out test set: " + ", ".join(parts), d
        parts = [f"{k}={float(v):.4f}" for k, v in d.items() if k.startswith("valid_")]
        return "info", "metrics", f"Step {d.get('step')}: " + ", ".join(parts), d
    if kind == contract.CHECKPOINT:
        return "info", "message", f"Checkpoint created at step {d.get('step')}", d
    if kind == contract.SUCCEEDED:
        return "info", "message", "The job has successfully completed", d
    if kind == contract.PAUSED:
        return "info", "message", f"Paused at step {d.get('step')}; resume to continue", d
    if kind == contract.CANCELLED:
        return "info", "message", f"Training stopped at step {d.get('step')} (cancelled)", d
    if kind == contract.FAILED:
        return "error", "message", str(d.get("message") or "Training failed"), d
    return "info", "message", kind, d


def _evaluation_message(report: contract.Report, job: Job) -> tuple[str, str, str, Any]:
    d = report.data
    if report.kind == contract.STARTED:
        text = (
            f"Evaluation started on {d.get('device', 'a worker')} (attempt {report.attempt}, "
            f"{d.get('rows')} rows, {len(d.get('models') or [])} models)"
        )
        return "info", "message", text, d
    if report.kind == contract.PROGRESS:
        text = f"Scored batch {d.get('step')}/{d.get('total_steps')} ({d.get('model')})"
        return "info", "metrics", text, d
    if report.kind == contract.CANCELLED:
        return "info", "message", "Evaluation stopped (cancelled); no results were kept", d
    return "info", "message", "The evaluation has completed", {"metrics": d.get("metrics")}


def _checkpoint(job: Job, step: int, uri: str, metrics: dict[str, Any]) -> None:
    model = customer_model_register(
        organization=job.organization,
        base=job.base_model,
        job_id=job.pk,
        suffix=job.suffix,
        kind="checkpoint",
        step=step,
        uri=uri,
        artifact_kind="full" if job.adapter is None else "lora",
        task=job.task,
        labels=job.labels,
        engagement_id=job.engagement_id,
    )
    JobCheckpoint.objects.for_organization(job.organization_id).get_or_create(
        job=job,
        step_number=step,
        defaults={
            "organization_id": job.organization_id,
            "metrics": metrics,
            "uri": uri,
            "fine_tuned_model_checkpoint": model.pk,
        },
    )
    if step >= job.last_checkpoint_step:
        job.last_checkpoint_step = step
        job.last_checkpoint_uri = uri


def _succeeded(job: Job, d: dict[str, Any]) -> None:
    if job.kind == JobKind.EVALUATION:
        first = False
        evaluation.evaluation_succeeded(job, d, prefix=dispatch.job_prefix(job))
    elif job.kind == JobKind.COMPRESSION:
        first = job.trained_tokens is None
        compression.compression_succeeded(job, d)
    else:
        first = _fine_tuned(job, d)
    job.status = JobStatus.SUCCEEDED
    job.finished_at = timezone.now()
    job.lease_expires_at = None
    job.current_step = int(d.get("step") or job.current_step)
    if first and job.dataset_version is not None:
        # A partner earns for the tokens a job trained on its listing, whatever the job.
        catalog.usage_record(
            customer=job.organization,
            version=job.dataset_version,
            job_id=job.pk,
            trained_tokens=int(job.trained_tokens or 0),
        )


def _fine_tuned(job: Job, d: dict[str, Any]) -> bool:
    """Register the fine-tuned model and bill its tokens; whether this was the first time."""
    model = customer_model_register(
        organization=job.organization,
        base=job.base_model,
        job_id=job.pk,
        suffix=job.suffix,
        kind="final",
        step=int(d.get("step") or job.current_step),
        uri=str(d["artifact_uri"]),
        artifact_kind=str(d.get("artifact_kind") or ("full" if job.adapter is None else "lora")),
        task=job.task,
        labels=job.labels,
        engagement_id=job.engagement_id,
    )
    job.fine_tuned_model = model.pk
    job.validation_metrics = _numbers(d.get("metrics"), "valid_")
    job.test_metrics = _numbers(d.get("test_metrics"), "test_")
    job_succeeded.send(sender=Job, job=job, model=model)
    if job.trained_tokens is not None:
        return False
    # Recorded once: this is what billing charges, and partners are credited for.
    job.trained_tokens = int(d.get("trained_tokens") or 0)
    meters.training_to_ledger(
        organization_id=job.organization_id,
        job_id=job.pk,
        base_model=job.base_model_id,
        trained_tokens=job.trained_tokens,
        at=timezone.now(),
        engagement_id=job.engagement_id,
    )
    return True


def _numbers(found: Any, prefix: str) -> dict[str, float] | None:
    """The `prefix…` metrics of a report, numbers only (None when there are none)."""
    if not isinstance(found, dict):
        return None
    kept = {
        str(k): float(v)
        for k, v in found.items()
        if str(k).startswith(prefix) and isinstance(v, int | float) and not isinstance(v, bool)
    }
    return kept or None


#: The report kinds that name stored objects, and the field that does; paused's is optional.
_URI_FIELDS = {
    contract.CHECKPOINT: "uri",
    contract.SUCCEEDED: "artifact_uri",
    contract.PAUSED: "checkpoint_uri",
}


def uri_under(uri: str, prefix: str) -> bool:
    """Whether `uri` names an object strictly below the "directory" URI `prefix`.

    Same scheme and bucket (or host), no query or fragment, and a path that
    continues `prefix`'s path with one or more plain segments: none empty, `.`
    or `..`, and none hiding a slash, backslash or NUL behind percent-encoding.
    """
    try:
        got, root = urlsplit(uri), urlsplit(prefix)
    except ValueError:
        return False
    if got.scheme.lower() != root.scheme.lower() or got.netloc != root.netloc:
        return False
    if got.query or got.fragment or "?" in uri or "#" in uri:
        return False
    base = root.path.rstrip("/") + "/"
    if not got.path.startswith(base):
        return False
    for segment in got.path[len(base) :].split("/"):
        name = unquote(segment)
        if name in ("", ".", "..") or any(c in name for c in "/\\\x00"):
            return False
    return True


def _foreign_uri(job: Job, report: contract.Report) -> tuple[str, str] | None:
    """(field, prefix) when the report's storage URI is not the job's own, else None."""
    field = _URI_FIELDS.get(report.kind)
    if field is None:
        return None
    uri = report.data.get(field)
    if uri is None and report.kind == contract.PAUSED:
        return None
    prefix = object_uri(dispatch.job_prefix(job))
    if isinstance(uri, str) and uri_under(uri, prefix):
        return None
    return field, prefix


def _refuse(job: Job, report: contract.Report, field: str, prefix: str) -> str:
    """Record a refused report as a warning event (under its key: a redelivery is a duplicate).

    The event (which the customer reads) names the field; the log, for operators, also
    the URI and the prefix it should have been under.
    """
    try:
        with transaction.atomic():
            event_add(
                job,
                f"A worker report ({report.kind}) was refused: its {field} is not under this "
                "job's storage prefix. Nothing of it was applied.",
                level=EventLevel.WARN,
                data={"refused_kind": report.kind, "field": field},
                attempt=report.attempt,
                seq=report.seq,
            )
    except IntegrityError:
        return "duplicate"
    log.warning(
        "jobs.report_refused",
        job_id=job.pk,
        organization_id=job.organization_id,
        attempt=report.attempt,
        seq=report.seq,
        kind=report.kind,
        field=field,
        uri=repr(report.data.get(field))[:1000],
        prefix=prefix,
    )
    return "refused"


def report_apply(payload: dict[str, Any]) -> str:
    """Apply one worker report. Returns what happened (for logs and tests)."""
    report = contract.Report.from_json(payload)
    with transaction.atomic():
        job = (
            Job.objects.dangerously_unscoped()
            .select_for_update(of=("self",))
            .select_related("organization", "base_model", "dataset_version", "test_file")
            .filter(pk=report.job_id)
            .first()
        )
        if job is None:
            log.warning("jobs.report_for_unknown_job", job_id=report.job_id)
            return "unknown_job"
        if report.attempt != job.attempt:
            log.info("jobs.stale_report", job_id=job.pk, attempt=report.attempt, kind=report.kind)
            return "stale"
        if report.kind == contract.HEARTBEAT:
            if job.dispatched_at is not None and not job.is_terminal:
                dispatch.renew_lease(job)
                job.save(update_fields=["lease_expires_at", "updated_at"])
            return "heartbeat"
        foreign = _foreign_uri(job, report)
        if foreign is not None:
            return _refuse(job, report, *foreign)
        level, type_, message, data = _message(report, job)
        try:
            with transaction.atomic():
                event = event_add(
                    job,
                    message,
                    level=level,
                    type=type_,
                    data=data,
                    attempt=report.attempt,
                    seq=report.seq,
                )
        except IntegrityError:
            return "duplicate"
        _apply(job, report)
        job.save()
        log.info("jobs.report_applied", job_id=job.pk, kind=report.kind, event_id=event.pk)
        if report.kind in contract.FINAL_KINDS:
            dispatch.schedule_dispatch()
    return "applied"


def _apply(job: Job, report: contract.Report) -> None:
    d = report.data
    kind = report.kind
    if job.is_terminal:
        return  # e.g. the last steps of a job cancelled meanwhile: recorded, not applied
    if kind not in contract.FINAL_KINDS and job.dispatched_at is not None:
        dispatch.renew_lease(job)
    if kind == contract.STARTED:
        if job.status == JobStatus.QUEUED:
            job.status = JobStatus.RUNNING
        job.started_at = job.started_at or timezone.now()
        job.total_steps = int(d.get("total_steps") or 0) or job.total_steps
    elif kind == contract.PROGRESS:
        job.current_step = max(job.current_step, int(d.get("step") or 0))
        if job.first_step_at is None and job.current_step >= 1:
            job.first_step_at = datetime.fromtimestamp(report.at, tz=UTC)
    elif kind == contract.CHECKPOINT:
        _checkpoint(job, int(d["step"]), str(d["uri"]), dict(d.get("metrics") or {}))
    elif kind == contract.SUCCEEDED:
        _succeeded(job, d)
    elif kind == contract.PAUSED:
        if d.get("checkpoint_uri"):
            _checkpoint(job, int(d["step"]), str(d["checkpoint_uri"]), {})
        job.dispatched_at = None
        job.lease_expires_at = None
        job.current_step = int(d.get("step") or job.current_step)
        if job.status != JobStatus.PAUSED:
            job.status = JobStatus.PAUSED  # a pause the worker chose (e.g. host draining)
    elif kind == contract.CANCELLED:
        job.status = JobStatus.CANCELLED
        job.finished_at = timezone.now()
        job.lease_expires_at = None
    elif kind == contract.FAILED:
        if d.get("retryable"):
            dispatch.lose_attempt(job, f"Attempt {job.attempt} failed: {d.get('message')}")
        else:
            job_fail(
                job,
                code=str(d.get("code") or "training_failed"),
                message=str(d.get("message") or "Training failed."),
                param=d.get("param"),
            )
