"""Model registry tasks on the `control` queue: ids in, a service call, safe to rerun."""

from __future__ import annotations

from celery import shared_task

from jobcontracts import queues

from . import estimates


@shared_task(
    name="controlplane.modelregistry.estimate_file",
    queue=queues.CONTROL,
    acks_late=True,
    soft_time_limit=3 * 3600,
    time_limit=3 * 3600 + 60,
)
def estimate_file(estimate_id: str, organization_id: str) -> str:
    return estimates.file_estimate_compute(
        estimate_id=estimate_id, organization_id=organization_id
    ).status
