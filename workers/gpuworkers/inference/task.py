"""The inference worker's entry points, around this process's one `Engine`.

Requests arrive on a Redis list (`intake.Intake`, a thread started when the
worker comes up), or sent by task name as the Celery task `gpuworkers.inference.run`
under the threads pool (`atelier worker inference`), each task thread handing
its request to the engine and waiting for it to end. Either way the engine
batches requests on the same model and reports each one's usage when it ends:
exactly one report per request that ran.

This module imports without torch; the engine is imported (and started, in the
background) when an inference worker comes up, or on the first request.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import TYPE_CHECKING, Any

from celery.signals import worker_ready, worker_shutdown

from gpuworkers.celery import app
from jobcontracts import queues
from jobcontracts.inference import ERROR, InferenceRequest

if TYPE_CHECKING:
    from gpuworkers.inference.scheduler import Engine

log = logging.getLogger(__name__)

_engine: Engine | None = None
_engine_lock = threading.Lock()


def engine() -> Engine:
    """This process's engine, started on first use."""
    global _engine
    if _engine is None:
        with _engine_lock:
            if _engine is None:
                from gpuworkers.inference.config import Settings
                from gpuworkers.inference.scheduler import Engine
                from gpuworkers.replies import channel_from_env

                _engine = Engine(Settings.from_env(), channel_from_env())
    return _engine


@app.task(  # type: ignore[untyped-decorator]
    name=queues.INFER,
    queue=queues.GPU_INFERENCE,
    # The broker never re-delivers a request: a caller waits seconds, not minutes,
    # and a request run twice would be billed twice.
    acks_late=False,
    reject_on_worker_lost=False,
    ignore_result=True,
)
def run(request_json: dict[str, Any]) -> None:
    try:
        request = InferenceRequest.from_json(request_json)
    except (KeyError, TypeError, ValueError) as error:
        request_id = request_json.get("request_id") if isinstance(request_json, dict) else None
        log.error(
            "inference.invalid_request", extra={"request_id": request_id, "error": str(error)}
        )
        if isinstance(request_id, str):
            data = {
                "status": 400,
                "code": "invalid_request",
                "message": f"invalid request: {error}",
            }
            engine().outbox.send(request_id, ERROR, data)
        return
    try:
        _model_code()
        # The engine reports the usage itself (through its outbox) when the request ends.
        engine().submit(request).wait()
    except Exception as error:
        # Whatever went wrong, the caller gets a clean error now rather than a timeout.
        log.exception("inference.request_crashed", extra={"request_id": request.request_id})
        data = {"status": 500, "code": "inference_failed", "message": f"inference failed: {error}"}
        engine().outbox.send(request.request_id, ERROR, data)
        raise


_model_code_lock = threading.Lock()
_model_code_loaded = False


def _model_code() -> None:
    """Import transformers/peft once, under a lock. transformers' lazy module is not
    thread-safe: a request thread importing from it while the preload thread is
    half-way through gets "cannot import name 'AutoTokenizer'"."""
    global _model_code_loaded
    if _model_code_loaded:
        return
    with _model_code_lock:
        if not _model_code_loaded:
            from gpuworkers.inference.models import preload_model_code

            preload_model_code()
            # Resolve the lazy attributes request threads use, while still serialised.
            from transformers import (  # noqa: F401
                AutoModel,
                AutoModelForCausalLM,
                AutoModelForSequenceClassification,
                AutoTokenizer,
            )

            _model_code_loaded = True


def _consumes_inference(consumer: Any) -> bool:
    try:
        return queues.GPU_INFERENCE in consumer.app.amqp.queues.consume_from
    except AttributeError:
        return False


@worker_ready.connect  # type: ignore[untyped-decorator]
def _preload(sender: Any = None, **_: Any) -> None:
    """Start the engine (torch, transformers, peft imported) as soon as an inference
    worker is up, so the first request does not pay for it."""
    if sender is None or not _consumes_inference(sender):
        return
    if os.environ.get("INFERENCE_LOG_REQUESTS", "0") != "1":
        # Celery logs every task received and finished at INFO: at thousands of
        # requests a second that is most of a worker's log and a real share of its CPU.
        for name in ("celery.app.trace", "celery.worker.strategy"):
            logging.getLogger(name).setLevel(logging.WARNING)

    def start() -> None:
        started = time.monotonic()
        engine()
        _model_code()
        log.info("inference.ready", extra={"seconds": round(time.monotonic() - started, 2)})

    url = os.environ.get("REDIS_URL", "")
    if not url:
        raise RuntimeError("An inference worker needs Redis: set REDIS_URL.")
    global _intake
    from gpuworkers.inference.intake import Intake

    _intake = Intake(
        url=url,
        queue=queues.GPU_INFERENCE,
        capacity=int(os.environ.get("INFERENCE_CONCURRENCY", "64")),
        engine=engine,
        before_first=start,
        # Batch API requests held at once (the low-priority lane) while no live request
        # is (unset: three quarters of the capacity, see intake.Intake), and while one is.
        batch_capacity=(
            int(os.environ["INFERENCE_BATCH_CONCURRENCY"])
            if os.environ.get("INFERENCE_BATCH_CONCURRENCY")
            else None
        ),
        batch_capacity_busy=int(os.environ.get("INFERENCE_BATCH_CONCURRENCY_BUSY", "1")),
    )
    _intake.start()


_intake: Any = None


@worker_shutdown.connect  # type: ignore[untyped-decorator]
def _close(**_: Any) -> None:
    if _intake is not None:
        _intake.stop()
    if _engine is not None:
        _engine.close()
