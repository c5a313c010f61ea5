"""Sending jobs to GPU workers: fair scheduling, specs, control signals, the lease reaper.

Fair queueing: a job is sent to the broker only while its organization has fewer
than its plan's `concurrent_fine_tuning_jobs` in flight; the rest wait here,
in the database, oldest first. So the broker queue never holds more than a
plan's worth of one tenant's jobs, and a tenant who submits 50 jobs delays
another tenant's single job by at most their concurrency limit, not by 50.

Recovery: a GPU worker acks its task on receipt (a long job is never redelivered
by the broker). The control plane instead holds a lease on each running attempt,
renewed by every report; when it runs out, the reaper re-dispatches the job as a
new attempt that resumes from the last checkpoint. The attempt number in the
storage signal fences the old worker should it still be alive.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import structlog
from django.conf import settings
from django.core.files.base import ContentFile
from django.core.files.storage import default_storage
from django.db import transaction
from django.db.models import Count
from django.utils import timezone

from controlplane.billing.plans import plan_for
from controlplane.celery import app
from controlplane.core.errors import NotFound
from controlplane.datasets.storage import delete_quietly, object_uri
from controlplane.tenancy.models import Organization
from jobcontracts import queues
from jobcontracts.training import (
    BaseModelRef,
    DataRef,
    Hyperparameters,
    LoraConfig,
    Signal,
    TrainingSpec,
)

from . import compression, evaluation
from .events import event_add, job_fail
from .models import EventLevel, Job, JobKind, JobStatus

log = structlog.get_logger(__name__)

#: Sequences are cut to the base model's context, and never longer than this.
MAX_SEQ_LEN = 2048
IN_FLIGHT = (JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.PAUSED)


def concurrency_limit(organization: Organization) -> int:
    return int(plan_for(organization).concurrent_fine_tuning_jobs)


def job_prefix(job: Job) -> str:
    return f"jobs/{job.organization_id}/{job.pk}"


def signal_name(job: Job) -> str:
    return f"{job_prefix(job)}/control.json"


def write_signal(job: Job, action: str) -> None:
    name = signal_name(job)
    delete_quietly(name)
    default_storage.save(name, ContentFile(Signal(attempt=job.attempt, action=action).to_bytes()))


def signal(job: Job, action: str) -> None:
    """Tell the job's worker to pause or cancel, once the current transaction commits."""
    job.signal_action = action
    job.save(update_fields=["signal_action", "updated_at"])
    transaction.on_commit(lambda: write_signal(job, action))


def schedule_prepare(job: Job) -> None:
    from .tasks import prepare_job

    job_id = job.pk
    transaction.on_commit(lambda: prepare_job.delay(job_id))


def schedule_dispatch() -> None:
    transaction.on_commit(dispatch_queued)


def build_spec(job: Job) -> TrainingSpec:
    base = job.base_model
    hp = job.hyperparameters
    source = job.training_file or job.dataset_version
    assert source is not None
    adapter = None
    if job.adapter is not None:
        adapter = LoraConfig(
            r=int(job.adapter.get("r", 8)),
            alpha=int(job.adapter.get("alpha", 16)),
            dropout=float(job.adapter.get("dropout", 0.0)),
            target_modules=tuple(job.adapter.get("target_modules") or ()),
        )
    validation = None
    if job.validation_file is not None:
        validation = DataRef(
            uri=object_uri(job.validation_file.storage_name), format=job.data_format
        )
    test = None
    if job.test_file is not None:
        test = DataRef(uri=object_uri(job.test_file.storage_name), format=job.data_format)
    prefix = job_prefix(job)
    return TrainingSpec(
        job_id=job.pk,
        attempt=job.attempt,
        organization_id=job.organization_id,
        task=job.task,
        method=job.method,
        base_model=BaseModelRef(
            name=base.pk, uri=base.uri, family=base.family, context_length=base.context_length
        ),
        training_data=DataRef(uri=object_uri(source.storage_name), format=job.data_format),
        validation_data=validation,
        test_data=test,
        test_fraction=float(hp.get("test_fraction") or 0.0),
        hyperparameters=Hyperparameters(
            n_epochs=int(hp["n_epochs"]),
            batch_size=int(hp["batch_size"]),
            learning_rate=float(hp["learning_rate"]),
            max_seq_len=min(base.context_length, MAX_SEQ_LEN),
            seed=int(job.seed),
            beta=float(hp.get("beta") or 0.1),
            group_by_length=bool(hp.get("group_by_length", True)),
            packing=bool(hp.get("packing", False)),
        ),
        output_uri=object_uri(prefix),
        control_uri=object_uri(signal_name(job)),
        adapter=adapter,
        labels=tuple(job.labels),
        resume_from=job.last_checkpoint_uri or None,
        gpus=job.gpus,
        checkpoint_every_steps=settings.JOBS_CHECKPOINT_EVERY_STEPS,
        checkpoint_every_seconds=settings.JOBS_CHECKPOINT_EVERY_SECONDS,
        heartbeat_seconds=settings.JOBS_HEARTBEAT_SECONDS,
    )


def _send(job: Job, spec: dict[str, Any]) -> None:
    write_signal(job, "run")
    task, queue = {
        JobKind.COMPRESSION: (queues.COMPRESS, queues.GPU_COMPRESSION),
        JobKind.EVALUATION: (queues.EVALUATE, queues.GPU_TRAINING),
    }.get(JobKind(job.kind), (queues.TRAIN, queues.GPU_TRAINING))
    app.send_task(task, args=[spec], queue=queue, ignore_result=True)
    log.info("jobs.dispatched", job_id=job.pk, attempt=job.attempt, kind=job.kind)


def _spec(job: Job) -> dict[str, Any]:
    where = {"output_uri": object_uri(job_prefix(job)), "control_uri": object_uri(signal_name(job))}
    if job.kind == JobKind.COMPRESSION:
        return compression.build_spec(job, **where).to_json()
    if job.kind == JobKind.EVALUATION:
        return evaluation.build_spec(job, **where).to_json()
    return build_spec(job).to_json()


def _dispatch(job: Job) -> bool:
    """Send the job's next attempt (on commit); False when it failed instead."""
    if job.kind == JobKind.EVALUATION:
        try:
            evaluation.models_of(job)
        except NotFound as error:  # a model deleted while the evaluation waited
            job_fail(job, code="model_not_found", message=str(error.detail), param="models")
            return False
    job.attempt += 1
    job.dispatched_at = timezone.now()
    job.lease_expires_at = None
    job.signal_action = "run"
    job.save()
    spec = _spec(job)
    resume = f", resuming from step {job.last_checkpoint_step}" if job.last_checkpoint_uri else ""
    event_add(job, f"Attempt {job.attempt} sent to a GPU worker{resume}")
    transaction.on_commit(lambda: _send(job, spec))
    return True


def dispatch_queued() -> list[str]:
    """Send queued jobs to the broker as far as each organization's plan allows."""
    jobs = Job.objects.dangerously_unscoped()
    dispatched: list[str] = []
    with transaction.atomic():
        waiting = set(
            jobs.filter(status=JobStatus.QUEUED, dispatched_at__isnull=True).values_list(
                "organization_id", flat=True
            )
        )
        if not waiting:
            return dispatched
        # Locking the organizations serialises dispatchers per tenant, so two control
        # processes can never both see a free slot and exceed the plan's limit.
        orgs = list(Organization.objects.select_for_update().filter(pk__in=waiting).order_by("pk"))
        busy = dict(
            jobs.filter(
                organization_id__in=waiting, dispatched_at__isnull=False, status__in=IN_FLIGHT
            )
            .values("organization_id")
            .annotate(n=Count("id"))
            .values_list("organization_id", "n")
        )
        for org in orgs:
            free = concurrency_limit(org) - busy.get(org.pk, 0)
            if free <= 0:
                continue
            for job in (
                Job.objects.for_organization(org)
                .filter(status=JobStatus.QUEUED, dispatched_at__isnull=True)
                .select_related(
                    "base_model",
                    "source_model",
                    "training_file",
                    "validation_file",
                    "test_file",
                    "dataset_version",
                    "organization",
                )
                .order_by("queued_at", "pk")[:free]
            ):
                if _dispatch(job):
                    dispatched.append(job.pk)
    return dispatched


def renew_lease(job: Job) -> None:
    job.lease_expires_at = timezone.now() + timedelta(seconds=settings.JOBS_LEASE_SECONDS)


def lose_attempt(job: Job, reason: str) -> None:
    """The attempt in flight is gone (dead worker, lost message, unexpected error): retry
    it from the last checkpoint, or fail the job once it has lost too many."""
    job.lost_attempts += 1
    job.lease_expires_at = None
    job.dispatched_at = None
    limit = settings.JOBS_MAX_ATTEMPTS
    if job.lost_attempts >= limit:
        job_fail(
            job,
            code="worker_lost",
            message=f"{reason}. The job was retried {limit} times from its last checkpoint "
            "and did not complete; nothing more will be retried or billed. Contact support "
            "with this job id if it keeps happening.",
        )
        transaction.on_commit(lambda: write_signal(job, "cancel"))
        return
    job.status = JobStatus.QUEUED
    job.save()
    where = f"step {job.last_checkpoint_step}" if job.last_checkpoint_uri else "the start"
    event_add(
        job,
        f"{reason}; retrying from {where} (attempt {job.lost_attempts + 1} of {limit})",
        level=EventLevel.WARN,
    )
    log.warning("jobs.attempt_lost", job_id=job.pk, attempt=job.attempt, reason=reason)


def reap() -> dict[str, int]:
    """Re-queue jobs whose worker went silent, then dispatch what can run. Run by beat."""
    now = timezone.now()
    jobs = Job.objects.dangerously_unscoped()
    lost = unpicked = 0
    with transaction.atomic():
        for job in jobs.select_for_update(skip_locked=True).filter(
            dispatched_at__isnull=False, lease_expires_at__lt=now, status__in=IN_FLIGHT
        ):
            if job.status == JobStatus.PAUSED:
                # Died while pausing: it stays paused, resumable from its last checkpoint.
                job.dispatched_at = job.lease_expires_at = None
                job.save()
                event_add(job, "The worker stopped while pausing", level=EventLevel.WARN)
                continue
            lose_attempt(
                job,
                f"The GPU worker stopped reporting (no heartbeat for "
                f"{settings.JOBS_LEASE_SECONDS:g}s) during attempt {job.attempt}",
            )
            lost += 1
        pickup_deadline = now - timedelta(seconds=settings.JOBS_PICKUP_TIMEOUT_SECONDS)
        for job in jobs.select_for_update(skip_locked=True).filter(
            status=JobStatus.QUEUED,
            dispatched_at__lt=pickup_deadline,
            lease_expires_at__isnull=True,
        ):
            lose_attempt(job, f"No GPU worker started attempt {job.attempt} in time")
            unpicked += 1
    dispatched = dispatch_queued()
    return {"lost": lost, "unpicked": unpicked, "dispatched": len(dispatched)}
