"""Inference tasks on the `control` queue: thin, named, safe to run twice."""

from __future__ import annotations

from typing import Any

from celery import shared_task
from celery.signals import worker_ready, worker_shutdown

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


_consumer: Any = None


@worker_ready.connect
def _start_usage_consumer(sender: Any = None, **_: Any) -> None:
    """Every control worker reads the usage stream, in a thread."""
    global _consumer
    try:
        consumes = queues.CONTROL in sender.app.amqp.queues.consume_from
    except AttributeError:
        return
    if not consumes or _consumer is not None:
        return
    from .usage_stream import UsageStreamConsumer

    _consumer = UsageStreamConsumer()
    _consumer.start()


@worker_shutdown.connect
def _stop_usage_consumer(**_: Any) -> None:
    if _consumer is not None:
        _consumer.stop()
