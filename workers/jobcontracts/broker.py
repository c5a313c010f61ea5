"""Broker configuration read from the environment, shared by every Celery app.

With `REDIS_URL` set the broker is Redis. With nothing configured it falls back
to kombu's filesystem transport under the data directory, so `make run` needs no
server. Both the Django control plane and the Django-free GPU workers call this,
so they always agree on where messages go.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def data_dir(environ: Mapping[str, str] | None = None) -> Path:
    env = os.environ if environ is None else environ
    default = Path(__file__).resolve().parents[2] / ".data"
    return Path(env.get("ATELIER_DATA_DIR", str(default)))


def celery_config(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Celery settings (lower-case names) for the broker named by the environment."""
    env = os.environ if environ is None else environ
    broker_url = env.get("CELERY_BROKER_URL") or env.get("REDIS_URL")
    config: dict[str, Any] = {
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "broker_connection_retry_on_startup": True,
        "task_default_queue": "control",
    }
    if broker_url:
        config["broker_url"] = broker_url
        config["result_backend"] = env.get("CELERY_RESULT_BACKEND", broker_url)
        # Redis re-delivers an unacknowledged message after this long: it must
        # exceed the longest task (training tasks checkpoint and re-queue).
        config["broker_transport_options"] = {"visibility_timeout": 6 * 3600}
        return config
    folder = data_dir(env) / "broker"
    for sub in ("queue", "processed", "control"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    config["broker_url"] = "filesystem://"
    config["broker_transport_options"] = {
        "data_folder_in": str(folder / "queue"),
        "data_folder_out": str(folder / "queue"),
        "processed_folder": str(folder / "processed"),
        # Broadcast/control exchanges; kombu's default is ./control in the working directory.
        "control_folder": str(folder / "control"),
        "store_processed": False,
    }
    results = data_dir(env) / "results"
    results.mkdir(parents=True, exist_ok=True)
    config["result_backend"] = f"file://{results}"
    return config
