"""Job events (OpenAI's `fine_tuning.job.event`) and the one way a job fails."""

from __future__ import annotations

from typing import Any

import structlog
from django.utils import timezone

from .models import EventLevel, Job, JobEvent, JobStatus

log = structlog.get_logger(__name__)


def event_add(
    job: Job,
    message: str,
    *,
    level: str = EventLevel.INFO,
    type: str = "message",
    data: dict[str, Any] | None = None,
    attempt: int | None = None,
    seq: int | None = None,
) -> JobEvent:
    """Record an event; one made from a worker report carries its `(attempt, seq)`."""
    return JobEvent.objects.create(
        organization_id=job.organization_id,
        job=job,
        level=level,
        type=type,
        message=message,
        data=data,
        attempt=attempt,
        seq=seq,
    )


def job_fail(job: Job, *, code: str, message: str, param: str | None = None) -> None:
    job.status = JobStatus.FAILED
    job.error = {"code": code, "message": message, "param": param}
    job.finished_at = timezone.now()
    job.lease_expires_at = None
    job.save()
    event_add(job, message, level=EventLevel.ERROR)
    log.warning("jobs.failed", job_id=job.pk, code=code)
