"""The batch reaper (beat, `controlplane.batches.reap`): a batch whose runner was lost
is sent again, and a batch that could not start within its window expires.

A runner holds its batch's PostgreSQL advisory lock for the whole run
(`runner.batch_run`); a runner killed with its control worker loses its connection and
the lock with it, and a lost broker message never took it. So a batch that is not
finished and whose lock can be taken has no runner, and its `run_batch` task is sent
again: the new runner sends the lines still pending (what the lost one recorded stays
recorded, once) and ends the batch, as expired when its window has passed.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

import structlog
from django.conf import settings
from django.db import connection
from django.utils import timezone

from controlplane.core.redis_clients import sync_client
from controlplane.datasets.models import FileStatus

from . import runner, services
from .models import ACTIVE, Batch, BatchStatus

log = structlog.get_logger(__name__)


@contextmanager
def runner_lock(batch_id: str) -> Iterator[bool]:
    """Takes the batch's runner lock if it is free, for the block; yields whether it did
    (False: a runner holds the batch)."""
    key = runner.advisory_key(batch_id)  # the runner's own key, so both always agree
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_try_advisory_lock(%s)", [key])
        taken = bool(cursor.fetchone()[0])
    try:
        yield taken
    finally:
        if taken:
            with connection.cursor() as cursor:
                cursor.execute("SELECT pg_advisory_unlock(%s)", [key])


def runner_alive(batch_id: str) -> bool:
    with runner_lock(batch_id) as free:
        return not free


def _resend_claim(batch_id: str, every: float) -> bool:
    """At most one resend per batch per `every` seconds, across reapers."""
    key = f"atelier:batches:resent:{batch_id}"
    return bool(sync_client().set(key, b"1", nx=True, px=max(1, int(every * 1000))))


def batches_reap() -> dict[str, int]:
    """Send again the runner of every unfinished batch no runner holds; expire the
    batches still validating past their window. Safe to run twice, and from several
    processes at once."""
    now = timezone.now()
    every = settings.BATCH_RESUME_AFTER_SECONDS
    settle = now - timedelta(seconds=every)
    resumed = expired = 0
    rows = (
        Batch.objects.dangerously_unscoped()
        .filter(status__in=ACTIVE)
        .values_list(
            "pk",
            "organization_id",
            "status",
            "created_at",
            "expires_at",
            "input_file__status",
            "input_file__deleted_at",
        )
        .order_by("created_at")
    )
    for batch_id, organization_id, status, created_at, expires_at, file_status, deleted in rows:
        if status == BatchStatus.VALIDATING and expires_at <= now:
            with runner_lock(batch_id) as free:
                if free and services.batch_expire_unstarted(
                    batch_id=batch_id, organization_id=organization_id
                ):
                    expired += 1
            continue
        if created_at > settle:
            continue  # its first task is likely still on its way
        if (
            status == BatchStatus.VALIDATING
            and deleted is None
            and file_status in (FileStatus.UPLOADED, FileStatus.PROCESSING)
        ):
            continue  # its task waits for the Files API's validation, retrying
        if runner_alive(batch_id) or not _resend_claim(batch_id, every):
            continue
        log.warning("batches.runner_lost", batch_id=batch_id, status=status)
        services.batch_schedule(batch_id=batch_id, organization_id=organization_id)
        resumed += 1
    return {"resumed": resumed, "expired": expired}
