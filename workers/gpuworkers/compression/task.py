"""The Celery task `gpuworkers.compression.run`: one attempt of a compression job.

This module imports without torch (the worker imports it at start): the runner and the
methods are imported inside the task. `handle` is the task's body with the reporter
given, for callers that do not send reports through the broker.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict
from typing import Any

from gpuworkers import logs
from gpuworkers.celery import app
from gpuworkers.reporting import celery_reporter
from gpuworkers.training.control import Reporter, SignalReader
from gpuworkers.training.task import preload_wait, report_invalid_spec
from jobcontracts import queues
from jobcontracts.compression import CompressionSpec

log = logging.getLogger(__name__)


def _limit(name: str) -> float | None:
    # A large model's calibration, recovery and measures take a while: no limit
    # unless the operator sets one.
    value = os.environ.get(name, "").strip()
    return float(value) if value else None


def handle(
    spec_json: Any, reporter: Reporter, *, signal_reader: SignalReader | None = None
) -> dict[str, Any]:
    try:
        if not isinstance(spec_json, dict):
            raise TypeError("the spec must be a JSON object")
        spec = CompressionSpec.from_json(spec_json)
    except (KeyError, TypeError, ValueError) as error:
        report_invalid_spec(spec_json, error, reporter, kind="compression")
        return {"status": "failed", "error_code": "invalid_spec"}
    log.info("compression.attempt_received", extra={"job_id": spec.job_id, "attempt": spec.attempt})
    preload_wait()
    from gpuworkers.compression.runner import run_compression

    return asdict(run_compression(spec, reporter, signal_reader=signal_reader))


@app.task(  # type: ignore[untyped-decorator]
    name=queues.COMPRESS,
    # Acknowledged on receipt, as fine-tuning: a lost attempt is re-queued by the
    # control plane's lease as a new attempt, never redelivered by the broker.
    acks_late=False,
    reject_on_worker_lost=False,
    ignore_result=True,
    soft_time_limit=_limit("GPU_COMPRESSION_SOFT_TIME_LIMIT_SECONDS"),
    time_limit=_limit("GPU_COMPRESSION_TIME_LIMIT_SECONDS"),
)
def run(spec_json: dict[str, Any]) -> dict[str, Any]:
    with logs.bound_job(spec_json):  # every line of the attempt carries its job id
        return handle(spec_json, celery_reporter(app))
