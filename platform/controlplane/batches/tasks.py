"""Batch tasks on the `control` queue: thin, named, safe to run twice."""

from __future__ import annotations

from celery import shared_task

from jobcontracts import queues

from . import reaper, runner


@shared_task(
    name="controlplane.batches.run",
    queue=queues.CONTROL,
    acks_late=True,
    bind=True,
    max_retries=7200,  # an hour of waiting for the input file's validation
    soft_time_limit=24 * 3600,
    time_limit=24 * 3600 + 60,
)
def run_batch(self: object, batch_id: str, organization_id: str) -> str:
    outcome = runner.batch_run(batch_id=batch_id, organization_id=organization_id)
    if outcome == "waiting":  # its input file is still being validated
        raise self.retry(countdown=0.5)  # type: ignore[attr-defined]
    return outcome


@shared_task(
    name="controlplane.batches.reap",
    queue=queues.CONTROL,
    acks_late=True,
    soft_time_limit=60,
    time_limit=90,
    expires=60,
)
def reap_batches() -> dict[str, int]:
    return reaper.batches_reap()
