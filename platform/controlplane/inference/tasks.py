"""Inference tasks on the `control` queue: thin, named, safe to run twice."""

from __future__ import annotations

from typing import Any

from celery import shared_task

from jobcontracts import queues

from . import usage


@shared_task(
    name=queues.CONTROL_USAGE_REPORT,
    queue=queues.CONTROL,
    acks_late=True,
    soft_time_limit=30,
    time_limit=60,
)
def record_usage(payload: dict[str, Any]) -> str:
    """A worker's `UsageReport` for one request; stored once however often it arrives."""
    return usage.usage_record(payload)
