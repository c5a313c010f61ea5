"""The Celery task `gpuworkers.evaluation.run`: one attempt of an evaluation job.

Imports without torch (the worker imports it at start); the runner is imported inside.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from typing import Any

from gpuworkers import logs
from gpuworkers.celery import app
from gpuworkers.reporting import celery_reporter
from gpuworkers.training.control import Reporter, SignalReader
from gpuworkers.training.task import preload_wait, report_invalid_spec
from jobcontracts import queues
from jobcontracts.evaluation import EvaluationSpec

log = logging.getLogger(__name__)


def handle(
    spec_json: Any, reporter: Reporter, *, signal_reader: SignalReader | None = None
) -> dict[str, Any]:
    try:
        if not isinstance(spec_json, dict):
            raise TypeError("the spec must be a JSON object")
        spec = EvaluationSpec.from_json(spec_json)
    except (KeyError, TypeError, ValueError) as error:
        report_invalid_spec(spec_json, error, reporter, kind="evaluation")
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
    with logs.bound_job(spec_json):  # every line of the attempt carries its job id
        return handle(spec_json, celery_reporter(app))
