"""Broker configuration read from the environment, shared by every Celery app.

The broker is the Redis named by `CELERY_BROKER_URL`, or else `REDIS_URL` (which
`make run` sets to its private Redis when nothing is configured). Both the Django
control plane and the Django-free GPU workers call this, so they always agree on
where messages go.
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


class BrokerNotConfigured(RuntimeError):
    """Neither CELERY_BROKER_URL nor REDIS_URL is set."""


def celery_config(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Celery settings (lower-case names) for the broker named by the environment."""
    env = os.environ if environ is None else environ
    broker_url = env.get("CELERY_BROKER_URL") or env.get("REDIS_URL")
    if not broker_url:
        raise BrokerNotConfigured(
            "No broker: set REDIS_URL (or CELERY_BROKER_URL), e.g. redis://HOST:6379/0. "
            "`make run` starts a private Redis and sets it."
        )
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
    config["broker_url"] = broker_url
    config["result_backend"] = env.get("CELERY_RESULT_BACKEND", broker_url)
    # Redis re-delivers an unacknowledged message after this long: it must
    # exceed the longest task (training tasks checkpoint and re-queue).
    config["broker_transport_options"] = {"visibility_timeout": 6 * 3600}
    return config
