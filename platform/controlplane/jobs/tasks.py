"""Job tasks on the `control` queue: thin, named, safe to run twice."""

from __future__ import annotations

from typing import Any

from celery import shared_task

from jobcontracts import queues

from . import dispatch, reports, services


@shared_task(
    name="controlplane.jobs.prepare",
    queue=queues.CONTROL,
    acks_late=True,
    soft_time_limit=3600,
    time_limit=3660,
)
def prepare_job(job_id: str) -> str:
    return services.job_prepare(job_id=job_id).status


@shared_task(
    name=queues.CONTROL_JOB_REPORT,
    queue=queues.CONTROL,
    acks_late=True,
    soft_time_limit=60,
    time_limit=90,
)
def apply_report(payload: dict[str, Any]) -> str:
    return reports.report_apply(payload)


@shared_task(
    name="controlplane.jobs.reap",
    queue=queues.CONTROL,
    acks_late=True,
    soft_time_limit=60,
    time_limit=90,
    expires=60,
)
def reap() -> dict[str, int]:
    return dispatch.reap()
