"""Celery app of the control plane (queue `control`): `atelier worker control`."""

import os
from typing import Any

import redis
import structlog
from celery import Celery
from celery.signals import worker_process_shutdown, worker_ready, worker_shutdown
from django.apps import apps
from django.db import connections
from django.db.models import Count, F, Sum, Value
from django.db.models.functions import Greatest
from prometheus_client import (
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector

from controlplane.core import metrics
from controlplane.core.redis_clients import sync_client
from jobcontracts import queues
from jobcontracts.inference import USAGE_GROUP, USAGE_STREAM, batch_queue, request_queue

# Production unless told otherwise (see manage.py).
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "controlplane.settings.production")

log = structlog.get_logger(__name__)

app = Celery("controlplane")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.conf.task_routes = {
    "controlplane.*": {"queue": queues.CONTROL},
    "gpuworkers.*": {"queue": queues.GPU_TRAINING},
}
app.autodiscover_tasks()


@app.task(name=queues.CONTROL_PING, soft_time_limit=10, time_limit=20)
def ping() -> dict[str, bool]:
    return {"ok": True}


# --- metrics: the control worker's own port (CONTROL_METRICS_PORT) ------------------------
#
# What an operator watches that no single request sees, computed at each scrape from
# Redis and PostgreSQL (a scrape every 15 s is a few cheap commands and one query):
# Celery queue depth, the inference request lists, jobs by kind and state (with lost
# attempts and re-dispatches), and how far the usage stream is behind the ledger. The
# counters the control worker's task processes increment (prefork children) are summed
# from PROMETHEUS_MULTIPROC_DIR, which `atelier worker control` empties at each start.

#: kombu's Redis transport keeps a queue's messages of priority p > 0 under `queue\x06\x16p`.
_PRIORITY_SEP = "\x06\x16"
_PRIORITY_STEPS = (3, 6, 9)


def celery_queue_lengths(client: Any) -> dict[str, int]:
    """LLEN of each Celery queue (every priority's list together), one pipeline."""
    names = (queues.CONTROL, *queues.GPU_QUEUES)
    pipe = client.pipeline(transaction=False)
    for name in names:
        for key in (name, *(f"{name}{_PRIORITY_SEP}{p}" for p in _PRIORITY_STEPS)):
            pipe.llen(key)
    lengths = pipe.execute()
    per = 1 + len(_PRIORITY_STEPS)
    return {name: sum(lengths[i * per : (i + 1) * per]) for i, name in enumerate(names)}


def _celery_queues() -> list[Metric]:
    depth = GaugeMetricFamily(
        "atelier_celery_queue_length",
        "Messages waiting in a Celery queue (Redis LLEN, all priorities).",
        labels=["queue"],
    )
    with redis.Redis.from_url(app.conf.broker_url, socket_timeout=2) as client:
        for name, length in celery_queue_lengths(client).items():
            depth.add_metric([name], length)
    return [depth]


def _inference_queues() -> list[Metric]:
    depth = GaugeMetricFamily(
        "atelier_inference_queue_length",
        "Inference requests waiting for a worker (Redis LLEN), live and Batch API lanes.",
        labels=["queue", "lane"],
    )
    client = sync_client()
    pipe = client.pipeline(transaction=False)
    pipe.llen(request_queue(queues.GPU_INFERENCE))
    pipe.llen(batch_queue(queues.GPU_INFERENCE))
    live, batch = pipe.execute()
    depth.add_metric([queues.GPU_INFERENCE, "live"], live)
    depth.add_metric([queues.GPU_INFERENCE, "batch"], batch)
    return [depth]


def _jobs() -> list[Metric]:
    # By label, at scrape time: this module is imported before Django's apps are loaded,
    # and by core.health (the control ping), which may not import an upper app.
    Job = apps.get_model("jobs", "Job")

    jobs = GaugeMetricFamily(
        "atelier_jobs",
        "GPU jobs (fine-tuning, compression, evaluation) by kind and state.",
        labels=["kind", "state"],
    )
    lost = GaugeMetricFamily(
        "atelier_job_lost_attempts",
        "Attempts lost so far (a lease expired, the worker vanished), all jobs of a kind; "
        "watch its increase.",
        labels=["kind"],
    )
    redispatched = GaugeMetricFamily(
        "atelier_job_redispatches",
        "Dispatches after a job's first, all jobs of a kind; watch its increase.",
        labels=["kind"],
    )
    try:
        rows = (
            Job.objects.dangerously_unscoped()  # every tenant's jobs, counted, none shown
            .values("kind", "status")
            .annotate(
                n=Count("id"),
                lost=Sum("lost_attempts"),
                # `attempt` counts dispatches; each job's first is not a re-dispatch.
                again=Sum(Greatest(F("attempt") - 1, Value(0))),
            )
            .order_by()
        )
        # Every kind and state is a series, 0 when no job is in it (bounded: the choices).
        counts = {
            (kind, state): 0
            for kind, _ in Job._meta.get_field("kind").flatchoices
            for state, _ in Job._meta.get_field("status").flatchoices
        }
        lost_by = {kind: 0 for kind, _ in counts}
        again_by = dict(lost_by)
        for row in rows:
            counts[row["kind"], row["status"]] = row["n"]
            lost_by[row["kind"]] = lost_by.get(row["kind"], 0) + (row["lost"] or 0)
            again_by[row["kind"]] = again_by.get(row["kind"], 0) + (row["again"] or 0)
    finally:
        connections.close_all()  # each scrape runs on a thread of its own: close its connection
    for (kind, state), n in counts.items():
        jobs.add_metric([kind, state], n)
    for kind, value in lost_by.items():
        lost.add_metric([kind], value)
    for kind, value in again_by.items():
        redispatched.add_metric([kind], value)
    return [jobs, lost, redispatched]


def _usage_stream() -> list[Metric]:
    client = sync_client()
    pipe = client.pipeline(transaction=False)
    pipe.xlen(USAGE_STREAM)
    pipe.xrange(USAGE_STREAM, count=1)
    pipe.xlen(f"{USAGE_STREAM}:dead")
    pipe.time()
    length, oldest, dead, (seconds, micros) = pipe.execute()
    try:
        groups = client.xinfo_groups(USAGE_STREAM)
    except redis.ResponseError:  # no stream yet
        groups = []
    group = next((g for g in groups if g["name"] in (USAGE_GROUP, USAGE_GROUP.encode())), {})
    now_ms = int(seconds) * 1000 + int(micros) // 1000
    # Stored entries are deleted (XDEL), so the oldest left is the oldest not yet in the
    # ledger; its id's first part is when a worker wrote it (Redis's clock, as `now_ms`).
    lag_s = max(0, now_ms - int(oldest[0][0].split(b"-")[0])) / 1000 if oldest else 0.0
    return [
        GaugeMetricFamily(
            "atelier_usage_stream_length",
            "Usage reports in the stream, not yet stored in the ledger.",
            value=length,
        ),
        GaugeMetricFamily(
            "atelier_usage_stream_pending",
            "Usage reports read by a control worker and not yet acknowledged (XPENDING).",
            value=group.get("pending", 0),
        ),
        GaugeMetricFamily(
            "atelier_usage_ledger_lag_seconds",
            "Age of the oldest usage report not yet in the ledger (0: none waiting).",
            value=lag_s,
        ),
        GaugeMetricFamily(
            "atelier_usage_dead_letters",
            "Usage reports parked in the dead-letter stream for an operator.",
            value=dead,
        ),
    ]


CONTROL_METRIC_SOURCES = {
    "celery_queues": _celery_queues,
    "inference_queues": _inference_queues,
    "jobs": _jobs,
    "usage_stream": _usage_stream,
}


def control_metrics_registry() -> CollectorRegistry:
    registry = CollectorRegistry()
    if metrics.multiprocess():
        MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    else:
        for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR):
            registry.register(collector)
    registry.register(metrics.SourcesCollector(CONTROL_METRIC_SOURCES))
    return registry


_metrics_server: Any = None


@worker_ready.connect
def _start_metrics_port(sender: Any = None, **_: Any) -> None:
    """The control worker (it consumes `control`) serves its metrics on its own port."""
    global _metrics_server
    from django.conf import settings

    try:
        consumes = queues.CONTROL in sender.app.amqp.queues.consume_from
    except AttributeError:
        return
    port = settings.CONTROL_METRICS_PORT
    if not consumes or not port or _metrics_server is not None:
        return
    host = settings.CONTROL_METRICS_HOST
    try:
        _metrics_server, _thread = start_http_server(
            port, addr=host, registry=control_metrics_registry()
        )
    except OSError as exc:  # a busy port must not stop the worker; Prometheus sees it down
        log.error("control.metrics_port_failed", host=host, port=port, error=str(exc))
        return
    log.info("control.metrics_port", host=host, port=port)


@worker_shutdown.connect
def _stop_metrics_port(**_: Any) -> None:
    if _metrics_server is not None:
        _metrics_server.shutdown()


@worker_process_shutdown.connect
def _pool_process_gone(**_: Any) -> None:
    # Pool processes are forked: no atexit runs there (core.metrics registers one).
    metrics.process_dead()
