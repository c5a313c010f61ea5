"""The Celery task `gpuworkers.training.run`: one attempt of a fine-tuning job.

This module imports without torch: the engine (torch, transformers, peft) is
imported inside the task, and pre-imported in each pool process when it starts
so a job's first step is not delayed by it. Model weights are only ever loaded
inside the task.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import asdict
from typing import Any

from celery.signals import worker_process_init

from gpuworkers import logs, metrics
from gpuworkers.celery import app
from gpuworkers.reporting import celery_reporter
from gpuworkers.training.control import Outcome, Reporter, SignalReader
from jobcontracts import queues
from jobcontracts.training import FAILED, Report, TrainingSpec

log = logging.getLogger(__name__)


def _limit(name: str) -> float | None:
    # Jobs run for hours; no limit unless the operator sets one.
    value = os.environ.get(name, "").strip()
    return float(value) if value else None


def execute(
    spec: TrainingSpec, reporter: Reporter, *, signal_reader: SignalReader | None = None
) -> Outcome:
    """Run one attempt: in this process on one device, or through torch's launcher
    on `spec.gpus` devices. `signal_reader` applies to the in-process path only
    (ranks read the signal from storage themselves)."""
    preload_wait()
    if spec.gpus > 1:
        from gpuworkers.training.launch import run_distributed

        return run_distributed(spec, reporter)
    from gpuworkers.training.engine import run_training

    try:
        return run_training(spec, reporter, signal_reader=signal_reader)
    finally:
        _release_memory()


def _release_memory() -> None:
    # The pool process lives on: hand the job's cached GPU memory back.
    import gc

    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@app.task(  # type: ignore[untyped-decorator]
    name=queues.TRAIN,
    # Acknowledged on receipt, not on completion: a job whose worker dies is
    # re-queued by the control plane's lease (resuming from its last checkpoint,
    # as a new attempt), so the broker must never redeliver a long job and run
    # it twice.
    acks_late=False,
    reject_on_worker_lost=False,
    ignore_result=True,
    soft_time_limit=_limit("GPU_TRAINING_SOFT_TIME_LIMIT_SECONDS"),
    time_limit=_limit("GPU_TRAINING_TIME_LIMIT_SECONDS"),
)
def run(spec_json: dict[str, Any]) -> dict[str, Any]:
    with logs.bound_job(spec_json):  # every line of the attempt carries its job id
        reporter = celery_reporter(app)
        try:
            spec = TrainingSpec.from_json(spec_json)
        except (KeyError, TypeError, ValueError) as error:
            report_invalid_spec(spec_json, error, reporter)
            return {"status": "failed", "error_code": "invalid_spec"}
        log.info(
            "training.attempt_received", extra={"job_id": spec.job_id, "attempt": spec.attempt}
        )
        try:
            outcome = execute(spec, reporter)
        except BaseException:
            metrics.attempt_ended("fine_tuning", "failed")
            raise
        metrics.attempt_ended("fine_tuning", outcome.status)
        return asdict(outcome)


def report_invalid_spec(
    spec_json: Any, error: Exception, reporter: Reporter, *, kind: str = "training"
) -> None:
    """A spec this worker cannot read fails its attempt (never retried), when the spec at
    least names the job and attempt; the training, compression and evaluation tasks share it."""
    job_id = spec_json.get("job_id") if isinstance(spec_json, dict) else None
    attempt = spec_json.get("attempt") if isinstance(spec_json, dict) else None
    log.error(f"{kind}.invalid_spec", extra={"job_id": job_id, "error": str(error)})
    if isinstance(job_id, str) and isinstance(attempt, int):
        data = {
            "code": "invalid_spec",
            "message": f"invalid {kind} spec: {error}",
            "param": None,
            "retryable": False,
        }
        reporter(Report(job_id, attempt, 0, FAILED, time.time(), data))


_preloading: threading.Thread | None = None


def preload_wait(timeout: float = 300.0) -> None:
    """Let the background imports finish before a task imports the same modules:
    transformers' lazy module is not safe to import from two threads at once (a task that
    arrives while the pool process is still preloading saw `cannot import name ...`)."""
    thread = _preloading
    if thread is not None and thread is not threading.current_thread():
        thread.join(timeout)


@worker_process_init.connect  # type: ignore[untyped-decorator]
def _preload(**_: Any) -> None:
    """Import torch, transformers and peft in each new pool process, in the
    background (the pool waits only seconds for a process to come up)."""
    global _preloading
    if os.environ.get("GPU_WORKER_PRELOAD", "1") == "0":
        return

    def load() -> None:
        started = time.monotonic()
        import gpuworkers.training.engine  # noqa: F401 - the import is the point
        from gpuworkers.training.modeling import preload_model_code

        preload_model_code()
        log.info("training.preloaded", extra={"seconds": round(time.monotonic() - started, 2)})

    _preloading = threading.Thread(target=load, name="training-preload", daemon=True)
    _preloading.start()
