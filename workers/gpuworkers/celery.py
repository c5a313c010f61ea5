"""Celery app of the GPU workers, configured from the environment (no Django).

Start with `atelier worker gpu` (training, compression) or `atelier worker
inference` (serving, threads pool). Models are loaded inside tasks, never at import,
so a worker starts fast and a host without a GPU can still import this module.
"""

from __future__ import annotations

import os
import platform
import socket
from typing import Any

from celery import Celery
from celery.signals import (
    setup_logging,
    worker_process_shutdown,
    worker_ready,
    worker_shutdown,
)

from gpuworkers import logs, metrics
from jobcontracts import queues
from jobcontracts.broker import celery_config

# No fixups: Celery would otherwise import Django whenever DJANGO_SETTINGS_MODULE is set.
# `include`: the worker imports the task modules at start (they import no torch).
# Not the "current" app: a process that imports both sides (the test suite, tools) must
# keep sending the control plane's shared tasks through the Django app.
app = Celery(
    "gpuworkers",
    fixups=[],
    include=[
        "gpuworkers.training.task",
        "gpuworkers.compression.task",
        "gpuworkers.evaluation.task",
        "gpuworkers.inference.task",
    ],
    set_as_current=False,
)
app.conf.update(celery_config())
# First match wins: inference has its own queue (and its own workers, threads pool);
# compression jobs have theirs, consumed by the same `gpu` workers as training.
app.conf.task_routes = {
    "gpuworkers.inference.*": {"queue": queues.GPU_INFERENCE},
    "gpuworkers.compression.*": {"queue": queues.GPU_COMPRESSION},
    "gpuworkers.*": {"queue": queues.GPU_TRAINING},
}
# A GPU worker takes a job only when a pool process is free. Training tasks are
# acknowledged on receipt, so without this a busy worker would reserve the next
# job and hold it for hours while another GPU host sits idle (Redis broker only;
# other transports keep the prefetch of 1 that `worker_prefetch_multiplier` gives).
app.conf.worker_disable_prefetch = True


@app.task(name=queues.GPU_PING, soft_time_limit=10, time_limit=20)
def ping() -> dict[str, Any]:
    """Report which host and accelerator answered; used by health checks and tests."""
    return {
        "ok": True,
        "hostname": socket.gethostname(),
        "pid": os.getpid(),
        "python": platform.python_version(),
        "accelerator": _accelerator(),
    }


def _accelerator() -> str:
    try:
        import torch  # heavy: only imported when asked
    except ImportError:
        return "none (torch not installed)"
    if torch.cuda.is_available():
        return f"cuda:{torch.cuda.get_device_name(0)}"
    return "cpu"


@setup_logging.connect
def _setup_logging(loglevel: int | str | None = None, **_: Any) -> None:
    """One JSON object a line (LOG_FORMAT), secrets removed: `gpuworkers.logs`. Connected,
    this receiver also keeps Celery from installing its own plain-text handlers."""
    logs.configure(loglevel or "INFO")


@worker_ready.connect
def _serve_metrics(sender: Any = None, **_: Any) -> None:
    """A gpu or inference worker of this app serves its metrics on its own port
    (GPU_METRICS_PORT, INFERENCE_METRICS_PORT; 0: none)."""
    try:
        if sender.app is not app:
            return
        consumes = set(sender.app.amqp.queues.consume_from)
    except AttributeError:
        return
    metrics.serve_port(metrics.port_for(consumes))


@worker_shutdown.connect
def _stop_metrics(**_: Any) -> None:
    metrics.stop_port()
    metrics.process_dead()


@worker_process_shutdown.connect
def _pool_process_gone(**_: Any) -> None:
    # A pool process's live gauges (its job's tokens/s) stop counting with it.
    metrics.process_dead()
