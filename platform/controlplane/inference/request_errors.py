"""Inference requests answered with an error, counted per minute (for the staff dashboard).

A request a worker ran leaves a `UsageRecord` (completed, cancelled or failed). One refused
or failed at the front door (bad key or input, unknown model, suspended, over a limit or
budget, no worker in time) left nothing anywhere but a log line. The serving router counts
each here by HTTP status, in one Redis hash per UTC minute (`HINCRBY`, kept two hours):
one round trip, off the response's path, and never a database write a flood of bad
requests could turn against PostgreSQL. Losing a count (Redis down) never fails a request.
"""

from __future__ import annotations

import time

import redis
import structlog

from controlplane.core.redis_clients import async_client, sync_client

log = structlog.get_logger(__name__)

KEY_PREFIX = "atelier:inference:errors:"
#: How long a minute's counts are kept: past the dashboard's hour, then gone.
TTL_SECONDS = 2 * 3600


def _key(minute: int) -> str:
    return f"{KEY_PREFIX}{minute}"


async def arecord(status: int, *, at: float | None = None) -> None:
    """Count one request answered with HTTP `status` (>= 400) at `at` (now)."""
    minute = int((time.time() if at is None else at) // 60)
    client, _ = async_client()
    try:
        async with client.pipeline(transaction=False) as pipe:
            pipe.hincrby(_key(minute), str(status), 1)
            pipe.expire(_key(minute), TTL_SECONDS)
            await pipe.execute()
    except redis.RedisError as exc:
        log.warning("inference.error_count_lost", status=status, error=str(exc))


def record(status: int, *, at: float | None = None) -> None:
    """`arecord` for synchronous callers (and tests that seed the counts)."""
    minute = int((time.time() if at is None else at) // 60)
    pipe = sync_client().pipeline(transaction=False)
    pipe.hincrby(_key(minute), str(status), 1)
    pipe.expire(_key(minute), TTL_SECONDS)
    pipe.execute()


def errors_since(*, minutes: int = 60, now: float | None = None) -> dict[int, int]:
    """Requests answered with an error in the last `minutes` whole minutes (this one
    included), by HTTP status; one Redis round trip."""
    current = int((time.time() if now is None else now) // 60)
    pipe = sync_client().pipeline(transaction=False)
    for minute in range(current - minutes + 1, current + 1):
        pipe.hgetall(_key(minute))
    counts: dict[int, int] = {}
    for bucket in pipe.execute():
        for status, count in bucket.items():
            counts[int(status)] = counts.get(int(status), 0) + int(count)
    return dict(sorted(counts.items()))
