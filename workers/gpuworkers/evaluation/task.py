"""The Celery task `gpuworkers.evaluation.run`: one attempt of an evaluation job.

Imports without torch (the worker imports it at start); the runner is imported inside.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from typing import Any

from gpuworkers.celery import app
from gpuworkers.reporting import celery_reporter
from gpuworkers.training.control import Reporter, SignalReader
from gpuworkers.training.task import preload_wait
from jobcontracts import queues
from jobcontracts.evaluation import EvaluationSpec
from jobcontracts.training import FAILED, Report

log = logging.getLogger(__name__)


def handle(
    spec_json: Any, reporter: Reporter, *, signal_reader: SignalReader | None = None
) -> dict[str, Any]:
    try:
        if not isinstance(spec_json, dict):
            raise TypeError("the spec must be a JSON object")
        spec = EvaluationSpec.from_json(spec_json)
    except (KeyError, TypeError, ValueError) as error:
        job_id = spec_json.get("job_id") if isinstance(spec_json, dict) else None
        attempt = spec_json.get("attempt") if isinstance(spec_json, dict) else None
        log.error("evaluation.invalid_spec", extra={"job_id": job_id, "error": str(error)})
        if isinstance(job_id, str) and isinstance(attempt, int):
            data = {"code": "invalid_spec", "message": f"invalid spec: {error}", "retryable": False}
            reporter(Report(job_id, attempt, 0, FAILED, time.time(), data))
        return {"status": "failed", "error_code": "invalid_spec"}
    preload_wait()
    from gpuworkers.evaluation.runner import run_evaluation

    return asdict(run_evaluation(spec, reporter, signal_reader=signal_reader))


@app.task(  # type: ignore[untyped-decorator]
    name=queues.EVALUATE,
    # As fine-tuning: acknowledged on receipt; a lost attempt is re-queued by the lease.
    acks_late=False,
    reject_on_worker_lost=False,
    ignore_result=True,
)
def run(spec_json: dict[str, Any]) -> dict[str, Any]:
    return handle(spec_json, celery_reporter(app))
