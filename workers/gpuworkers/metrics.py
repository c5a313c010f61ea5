"""Prometheus metrics of the GPU workers (training, compression, evaluation) and the
inference workers, served on the worker's own port (`serve_port`, from `celery.py`).

`atelier worker gpu|inference` empties a PROMETHEUS_MULTIPROC_DIR at every start
(controlplane.cli.metrics_dir), so the prefork children of a `gpu` worker (one a GPU)
write their samples there and the port sums them; the inference worker is one process.

The metrics are defined here and incremented where the engine and the training loop
do the thing (their call sites are listed in the report of issue 15). Labels are
bounded: `kind` is one of jobcontracts.inference.KINDS (or a job kind), `reason` one
of REFUSAL_REASONS or `other`, `lane` live or batch; never a request, model,
organization or job id (the usage records hold those, exactly). No metric is ever
labelled by model: a customer's fine-tune id is theirs, and even base-model names are
an operator's free choice; per-model numbers come from the usage records.

Cheap on the hot path: nothing is counted per token. A request is counted once when
it ends (`request_ended`), its queue wait and first token once each, a decoding step
is one histogram observation, and the KV-cache gauge moves only when rows join or
leave a batch. METRICS_ENABLED=0 (as the web's setting) turns all of it off and
serves no port: what the benchmarks compare against.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any, Final

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    start_http_server,
)
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from jobcontracts import queues
from jobcontracts.inference import KINDS

log = logging.getLogger(__name__)


def _enabled(environ: Mapping[str, str]) -> bool:
    # django-environ's reading of a bool, as the web's METRICS_ENABLED is read.
    value = environ.get("METRICS_ENABLED", "1").strip().lower()
    return value not in ("0", "false", "no", "off", "n", "f", "")


#: Whether this process counts anything (METRICS_ENABLED; read once, at import).
ENABLED: Final = _enabled(os.environ)

MULTIPROC_ENV: Final = "PROMETHEUS_MULTIPROC_DIR"
#: Default ports: a `gpu` worker's and an `inference` worker's (both may run on one host,
#: as under `make run`). GPU_METRICS_PORT / INFERENCE_METRICS_PORT change them; 0: none.
GPU_METRICS_PORT: Final = 9102
INFERENCE_METRICS_PORT: Final = 9103

#: Why the worker refused a request (a ModelError's code, 429 or 503); any other: `other`.
REFUSAL_REASONS: Final = (
    "overloaded",
    "model_unavailable",
    "insufficient_memory",
    "out_of_memory",
    "worker_lost",
    "rate_limited",
)
OUTCOMES: Final = ("completed", "cancelled", "failed")
JOB_KINDS: Final = ("fine_tuning", "compression", "evaluation")
LANES: Final = ("live", "batch")

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

# --- inference ----------------------------------------------------------------------------
INFERENCE_REQUESTS = Counter(
    "atelier_inference_requests_total",
    "Inference requests the worker finished, by kind and outcome.",
    ["kind", "outcome"],
)
INFERENCE_TOKENS_IN = Counter(
    "atelier_inference_tokens_in_total", "Prompt (input) tokens processed, by kind.", ["kind"]
)
INFERENCE_TOKENS_OUT = Counter(
    "atelier_inference_tokens_out_total", "Tokens generated (output), by kind.", ["kind"]
)
TIME_TO_FIRST_TOKEN = Histogram(
    "atelier_inference_time_to_first_token_seconds",
    "From the worker taking a request to its first token (or its result), by kind.",
    ["kind"],
    buckets=_LATENCY,
)
QUEUE_WAIT = Histogram(
    "atelier_inference_queue_wait_seconds",
    "From the gateway queueing a request to a worker taking it, by lane.",
    ["lane"],
    buckets=_LATENCY,
)
BATCH_SIZE = Histogram(
    "atelier_inference_batch_size",
    "Sequences in one decoding step of one model.",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)
MEMORY_USED = Gauge(
    "atelier_inference_memory_used_bytes",
    "Accelerator memory the engine holds, by use (weights: loaded models and adapters; "
    "kv_cache: the decoding batches' KV caches).",
    ["use"],
    multiprocess_mode="livesum",
)
MEMORY_BUDGET = Gauge(
    "atelier_inference_memory_budget_bytes",
    "Accelerator memory the engine may fill with models and caches.",
    multiprocess_mode="livesum",
)
MODELS_LOADED = Gauge(
    "atelier_inference_models_loaded",
    "Models (base weights) loaded now.",
    multiprocess_mode="livesum",
)
MODEL_LOADS = Counter(
    "atelier_inference_model_loads_total", "Model loads, by outcome (ok, failed).", ["outcome"]
)
MODEL_LOAD_SECONDS = Histogram(
    "atelier_inference_model_load_seconds",
    "Time to fetch and load a model onto the device.",
    buckets=(0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
)
MODEL_EVICTIONS = Counter(
    "atelier_inference_model_evictions_total",
    "Models unloaded to make room for another.",
)
COLD_STARTS = Counter(
    "atelier_inference_cold_starts_total",
    "Requests that had to wait for their model (or adapter) to load, by kind.",
    ["kind"],
)
REFUSALS = Counter(
    "atelier_inference_refusals_total",
    "Requests the worker refused, by status (429, 503) and reason.",
    ["status", "reason"],
)

# --- GPU jobs -----------------------------------------------------------------------------
JOB_TOKENS = Counter(
    "atelier_job_tokens_total", "Tokens trained on (or processed), by job kind.", ["kind"]
)
JOB_TOKENS_PER_SECOND = Gauge(
    "atelier_job_tokens_per_second",
    "Throughput of the job attempt running in a worker process, at its last step.",
    ["kind"],
    multiprocess_mode="livesum",
)
JOB_ATTEMPTS = Counter(
    "atelier_job_attempts_total",
    "Job attempts that ended in this worker, by kind and outcome (succeeded, failed, "
    "cancelled, paused, superseded).",
    ["kind", "outcome"],
)
JOB_LEASE_EXPIRIES = Counter(
    "atelier_job_lease_expiries_total",
    "Attempts stopped because the control plane had given the job to a newer attempt "
    "(this one's lease expired), by kind.",
    ["kind"],
)

for _kind in KINDS:  # every bounded series exists (at 0) from the start
    for _outcome in OUTCOMES:
        INFERENCE_REQUESTS.labels(kind=_kind, outcome=_outcome)
    INFERENCE_TOKENS_IN.labels(kind=_kind)
    INFERENCE_TOKENS_OUT.labels(kind=_kind)
for _reason in REFUSAL_REASONS:
    REFUSALS.labels(status="503", reason=_reason)
for _job_kind in JOB_KINDS:
    JOB_TOKENS.labels(kind=_job_kind)
    JOB_LEASE_EXPIRIES.labels(kind=_job_kind)


def kind_label(kind: str) -> str:
    return kind if kind in KINDS else "other"


#: Attempt outcomes (`training.control.Outcome.status`) as JOB_ATTEMPTS counts them.
ATTEMPT_OUTCOMES: Final = {
    "succeeded": "succeeded",
    "failed": "failed",
    "cancelled": "cancelled",
    "paused": "paused",
    "stale": "superseded",
}


def attempt_ended(kind: str, status: str) -> None:
    if ENABLED:
        outcome = ATTEMPT_OUTCOMES.get(status, "failed")
        JOB_ATTEMPTS.labels(kind=kind if kind in JOB_KINDS else "other", outcome=outcome).inc()


def lease_expired(kind: str) -> None:
    """An attempt found the job given to a newer attempt (its lease had expired)."""
    if ENABLED:
        JOB_LEASE_EXPIRIES.labels(kind=kind if kind in JOB_KINDS else "other").inc()


# The children the engine moves, looked up once (`labels()` costs a lock and a dict).
_ENDED: dict[tuple[str, str], tuple[Any, Any, Any]] = {}
_QUEUE_WAIT = {lane: QUEUE_WAIT.labels(lane=lane) for lane in LANES}
_FIRST_TOKEN = {kind: TIME_TO_FIRST_TOKEN.labels(kind=kind) for kind in KINDS}
_COLD = {kind: COLD_STARTS.labels(kind=kind) for kind in KINDS}
KV_CACHE_BYTES = MEMORY_USED.labels(use="kv_cache")
WEIGHTS_BYTES = MEMORY_USED.labels(use="weights")


def request_ended(kind: str, status: str, prompt_tokens: int, completion_tokens: int) -> None:
    """A request that ran has ended (`status`: its usage report's): once per request."""
    key = (kind, status)
    children = _ENDED.get(key)
    if children is None:
        label = kind_label(kind)
        outcome = status if status in OUTCOMES else "failed"
        children = _ENDED[key] = (
            INFERENCE_REQUESTS.labels(kind=label, outcome=outcome),
            INFERENCE_TOKENS_IN.labels(kind=label),
            INFERENCE_TOKENS_OUT.labels(kind=label),
        )
    requests, tokens_in, tokens_out = children
    requests.inc()
    if prompt_tokens:
        tokens_in.inc(prompt_tokens)
    if completion_tokens:
        tokens_out.inc(completion_tokens)


def queue_waited(batch: bool, seconds: float) -> None:
    _QUEUE_WAIT["batch" if batch else "live"].observe(max(0.0, seconds))


def first_token(kind: str, seconds: float) -> None:
    child = _FIRST_TOKEN.get(kind)
    if child is None:
        child = TIME_TO_FIRST_TOKEN.labels(kind="other")
    child.observe(max(0.0, seconds))


def cold_start(kind: str) -> None:
    child = _COLD.get(kind)
    if child is None:
        child = COLD_STARTS.labels(kind="other")
    child.inc()


def refusal(status: int, code: str) -> None:
    """Count one refused request: `code` is its error code (a ModelError's)."""
    if not ENABLED:
        return
    reason = code if code in REFUSAL_REASONS else "other"
    REFUSALS.labels(status=str(status), reason=reason).inc()


def multiprocess() -> bool:
    # Set at all (even empty) is what makes prometheus-client write files: the same test.
    return MULTIPROC_ENV in os.environ


def process_dead() -> None:
    """This process's live gauges leave the sum (its counters stay in it)."""
    if multiprocess():
        mark_process_dead(os.getpid())  # type: ignore[no-untyped-call]


def registry() -> CollectorRegistry:
    """What the port serves: every process's files summed (multiprocess), or this one's."""
    if not multiprocess():
        return REGISTRY
    summed = CollectorRegistry()
    MultiProcessCollector(summed)  # type: ignore[no-untyped-call]
    return summed


def port_for(consumes: set[str] | frozenset[str], environ: dict[str, str] | None = None) -> int:
    """The metrics port of a worker consuming `consumes`: the inference one, or the gpu one."""
    env = dict(os.environ) if environ is None else environ
    if queues.GPU_INFERENCE in consumes:
        return int(env.get("INFERENCE_METRICS_PORT", str(INFERENCE_METRICS_PORT)))
    return int(env.get("GPU_METRICS_PORT", str(GPU_METRICS_PORT)))


_server: Any = None


def serve_port(port: int, host: str | None = None) -> bool:
    """Serve `registry()` on `port` in a thread (once a process). A busy port is logged,
    never fatal: the worker works on, and Prometheus shows its target down."""
    global _server
    if not port or _server is not None:
        return False
    if not ENABLED:
        log.info("metrics off (METRICS_ENABLED=0): no port served")
        return False
    addr = host or os.environ.get("METRICS_HOST", "0.0.0.0")  # noqa: S104 - scraped by IP
    try:
        _server, _ = start_http_server(port, addr=addr, registry=registry())
    except OSError as exc:
        log.error("metrics port %s:%s not served: %s", addr, port, exc)
        return False
    log.info("metrics on %s:%s", addr, port)
    return True


def stop_port() -> None:
    global _server
    if _server is not None:
        _server.shutdown()
        _server = None
