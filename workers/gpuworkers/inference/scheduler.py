"""The per-process inference engine: one thread owns the models and runs every forward.

Celery task threads call `Engine.submit` (tokenizing on their own thread) and
wait on the returned `Ticket`. The engine thread loops:

1. take submitted jobs and file them under their model (`Slot`), in LRU order;
2. advance model loads: copy and size the weights on the loader thread, evict
   idle least-recently-used models until the new one fits the memory budget,
   load on the loader thread; LoRA adapters are copied on the loader thread and
   attached to their already-loaded base here, between forwards;
3. for each loaded model: encode waiting embedding/classification inputs in one
   forward, admit waiting generation requests into its `DecodeBatch` (prefill),
   and run one decode step for all its rows.

Replies and cancellations go through the `Outbox` thread; the engine never
waits on the network.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gpuworkers import metrics
from gpuworkers.inference import models
from gpuworkers.inference.config import Settings
from gpuworkers.inference.decode import DecodeBatch, Row
from gpuworkers.inference.encode import classify, embed, truncate
from gpuworkers.inference.jobs import (
    BASE,
    COMPLETED,
    DROPPED,
    FAILED,
    OVERLOADED,
    REFUSED,
    Job,
    Ticket,
)
from gpuworkers.inference.models import ModelError, ModelKey
from gpuworkers.inference.prepare import Tokenizers, prepare
from gpuworkers.outbox_process import ProcessOutbox
from gpuworkers.replies import Outbox, OutboxOptions, RedisChannel, ReplyChannel
from gpuworkers.usage_spool import UsageSpool
from jobcontracts.inference import BATCH_REQUEST_PREFIX, DONE, ERROR, START, InferenceRequest

log = logging.getLogger(__name__)

#: How long after its last live (not Batch API) generation the engine counts as busy.
BATCH_QUIET_SECONDS = 0.5
#: Batch API rows decoding at once while busy. They never share a forward with live
#: rows (one more row makes every step of a small model a fifth slower): they step
#: only when no live generation runs or waits, so this bounds how long a live
#: request arriving then can wait (one step or prefill of these few rows).
BATCH_ROWS_BUSY = 4

NEW, FETCHING, FETCHED, LOADING, READY, FAILED_LOAD = (
    "new",
    "fetching",
    "fetched",
    "loading",
    "ready",
    "failed",
)


@dataclass
class AdapterSlot:
    state: str = NEW
    future: Future[Path] | None = None
    error: ModelError | None = None


@dataclass
class Slot:
    key: ModelKey
    state: str = NEW
    future: Future[Any] | None = None
    folder: Path | None = None
    estimate: int = 0
    loaded: models.Loaded | None = None
    batch: DecodeBatch | None = None
    #: Batch API rows (`_is_batch`), decoded apart from the live ones in `batch`.
    lane: DecodeBatch | None = None
    pending: deque[Job] = field(default_factory=deque)
    #: Jobs that started (replied `start`) and have not ended.
    active: set[Job] = field(default_factory=set)
    refs: int = 0
    adapters: dict[str, AdapterSlot] = field(default_factory=dict)
    adapter_refs: Counter[str] = field(default_factory=Counter)


@dataclass
class Stats:
    loads: Counter[str] = field(default_factory=Counter)
    adapter_loads: Counter[str] = field(default_factory=Counter)
    evictions: list[str] = field(default_factory=list)
    prefills: int = 0
    steps: int = 0
    #: The most rows one model decoded together.
    peak_rows: int = 0


def outbox_for(channel: ReplyChannel, settings: Settings) -> Outbox | ProcessOutbox:
    """The engine's outbox: in a child process for Redis (off the decode loop's GIL),
    a thread otherwise (in-memory tests)."""
    options: OutboxOptions = {
        "cancel_check_s": settings.cancel_check_ms / 1000,
        "heartbeat_s": settings.heartbeat_s,
        "stream_interval_s": settings.stream_interval_ms / 1000,
        "stream_interval_max_s": settings.stream_interval_max_ms / 1000,
    }
    if not isinstance(channel, RedisChannel):
        return Outbox(channel, **options)
    if settings.outbox_process:
        channel.close()  # never used here: the child opens its own
        return ProcessOutbox(channel.url, options, spool_dir=settings.usage_spool_dir)
    return Outbox(channel, spool=UsageSpool(settings.usage_spool_dir), **options)


class Engine:
    def __init__(self, settings: Settings, channel: ReplyChannel, *, start: bool = True) -> None:
        self.settings = settings
        #: When a live generation was last waiting or running, and whether one is now
        #: (on any model): the batch lane steps only when none is (see `_serve`).
        self._live_at = 0.0
        self._live_now = False
        self.outbox = outbox_for(channel, settings)
        self.tokenizers = Tokenizers(settings)
        self.device = models.pick_device(settings)
        self.dtype = models.pick_dtype(settings, self.device)
        self.budget = models.memory_budget(settings, self.device)
        if metrics.ENABLED:
            metrics.MEMORY_BUDGET.set(self.budget)
        self.stats = Stats()
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        self._cond = threading.Condition()
        self._inbox: list[Job] = []
        self._incoming = 0  # tasks tokenizing right now: known to be arriving
        self._waiting = 0  # submitted and not started
        self._closing = False
        self._slots: OrderedDict[ModelKey, Slot] = OrderedDict()
        self._loader = ThreadPoolExecutor(1, thread_name_prefix="inference-loader")
        self._thread = threading.Thread(target=self._run, name="inference-engine", daemon=True)
        if start:
            self.start()

    # -- the task side ----------------------------------------------------------------

    def start(self) -> None:
        self.outbox.start()
        if not self._thread.is_alive():
            self._thread.start()

    def submit(self, request: InferenceRequest) -> Ticket:
        """Queue a request; never blocks on the models. The ticket resolves when it ends."""
        return self.submit_many([request])[0]

    def submit_many(self, requests: Sequence[InferenceRequest]) -> list[Ticket]:
        """Queue requests taken together (a burst off the Redis list): tokenized on this
        thread, their routes handed to the outbox in one write, and given to the engine
        at once. Every handoff to the outbox process can wait for the GIL behind the
        decode loop, so a burst pays for one, not two per request."""
        with self._cond:
            self._incoming += len(requests)  # the engine waits a moment for these
        try:
            # Routes (and refusals) reach the outbox before any job is visible to the
            # engine: a `start` can never overtake its route.
            with self.outbox.batched():
                taken = [self._take(request) for request in requests]
        finally:
            with self._cond:
                self._incoming -= len(requests)
        jobs = [job for _, job in taken if job is not None]
        overloaded: list[Job] = []
        if jobs:
            with self._cond:
                for job in jobs:
                    if self._waiting >= self.settings.max_queue:
                        overloaded.append(job)
                        continue
                    self._waiting += 1
                    self._inbox.append(job)
                self._cond.notify()
        if overloaded:
            error = ModelError(503, "overloaded", "the model is overloaded: retry in a moment")
            with self.outbox.batched():
                for job in overloaded:
                    self.outbox.unwatch(job.request_id)
                    self._error(job.request_id, error)
                    metrics.refusal(error.status, error.code)
                    _log_request(job.request, OVERLOADED, None, job)
                    job.ticket.resolve(OVERLOADED)
        return [ticket for ticket, _ in taken]

    def _take(self, request: InferenceRequest) -> tuple[Ticket, Job | None]:
        ticket = Ticket(request.request_id)
        # Replies go to the caller's process channel; the request's end (with its usage
        # report, if it ran) follows its last reply through the outbox, in order.
        self.outbox.route(request.request_id, request.reply_to)
        ticket.add_done_callback(lambda t: self.outbox.finish(t.request_id, t.usage))
        if request.deadline and time.time() > request.deadline:
            ticket.resolve(DROPPED)  # the caller has given up: nothing to answer, nothing to bill
            return ticket, None
        try:
            prepared = prepare(request, self.tokenizers)
        except Exception as error:  # one bad request never takes its burst down with it
            if not isinstance(error, ModelError):
                log.exception("inference.prepare_failed", extra={"request_id": request.request_id})
                error = ModelError(500, "inference_failed", f"inference failed: {error}")
            self._error(request.request_id, error)
            if error.status in (429, 503):  # a missing model; bad input is no refusal
                metrics.refusal(error.status, error.code)
            _log_request(request, REFUSED, None, code=error.code)
            ticket.resolve(REFUSED)
            return ticket, None
        self.outbox.watch(request.request_id)
        return ticket, Job(request, prepared, ticket)

    def close(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)
        self._loader.shutdown(wait=False, cancel_futures=True)
        self.outbox.close()

    def loaded(self) -> list[ModelKey]:
        """Keys of the models in memory now, least recently used first (a snapshot, for
        tests and health checks: read while the engine is idle)."""
        return [key for key, slot in list(self._slots.items()) if slot.loaded is not None]

    def _error(
        self, request_id: str, error: ModelError, usage: dict[str, int] | None = None
    ) -> None:
        """The request's error reply. `usage`: what a request that ran is billed for (the
        same as its usage report), so the gateway settles its budget at what the ledger
        records; None for one that never ran."""
        data: dict[str, Any] = {
            "status": error.status,
            "code": error.code,
            "message": error.message,
        }
        if usage is not None:
            data["usage"] = usage
        self.outbox.send(request_id, ERROR, data)

    def _fail_started(self, slot: Slot, job: Job, failure: ModelError) -> None:
        """A request that ran fails: its error says what it used, and it is billed that."""
        self._error(job.request_id, failure, job.usage_data())
        self._end(slot, job, FAILED, job.usage("failed"), started=True)

    # -- the engine thread ------------------------------------------------------------

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cond:
                    if self._closing:
                        return
                    jobs, self._inbox = self._inbox, []
                    incoming = self._incoming
                # Everything this iteration hands the outbox goes in one write.
                with self.outbox.batched():
                    try:
                        worked, wake_in = self._iterate(jobs, incoming)
                    except Exception:  # never let the thread die with requests waiting on it
                        log.exception("inference.engine_failed")
                        try:
                            self._fail_everything()
                        except Exception:
                            log.exception("inference.engine_cleanup_failed")
                        worked, wake_in = False, 0.01
                if not worked:
                    with self._cond:
                        if not self._inbox and not self._closing:
                            self._cond.wait(wake_in)

    def _iterate(self, jobs: list[Job], incoming: int) -> tuple[bool, float | None]:
        for job in jobs:
            self._register(job)
        self._advance_loads()
        worked = False
        wake_in: float | None = None
        now = time.time()
        self._live_now = any(
            (slot.batch is not None and len(slot.batch) > 0)
            or any(j.generating and not _is_batch(j) and self._ready(slot, j) for j in slot.pending)
            for slot in self._slots.values()
            if slot.state == READY
        )
        if self._live_now:
            self._live_at = time.monotonic()
        for slot in list(self._slots.values()):
            self._expire(slot, now)
            if slot.state != READY:
                if slot.pending:
                    wake_in = 0.05 if wake_in is None else min(wake_in, 0.05)
                continue
            try:
                did, wait = self._serve(slot, incoming)
            except Exception as error:
                log.exception("inference.forward_failed", extra={"model": slot.key.uri})
                self._crash(slot, error)
                did, wait = True, None
            worked = worked or did
            if wait is not None:
                wake_in = wait if wake_in is None else min(wake_in, wait)
        return worked, wake_in

    def _register(self, job: Job) -> None:
        slot = self._slots.get(job.key)
        if slot is None:
            slot = self._slots[job.key] = Slot(job.key)
        self._slots.move_to_end(job.key)
        slot.refs += 1
        if job.adapter_uri:
            slot.adapter_refs[job.adapter_uri] += 1
            if job.adapter_uri not in slot.adapters:
                slot.adapters[job.adapter_uri] = AdapterSlot()
        slot.pending.append(job)

    def _expire(self, slot: Slot, now: float) -> None:
        """Drop waiting jobs whose caller gave up (deadline, or cancelled before starting)."""
        if not slot.pending:
            return
        cancelled = self.outbox.cancelled
        gone = [
            j
            for j in slot.pending
            if j.started is None and (j.expired(now) or j.request_id in cancelled)
        ]
        for job in gone:
            slot.pending.remove(job)
            self._end(slot, job, DROPPED, None, started=False)

    # -- loading ----------------------------------------------------------------------

    def _wake(self, _future: Future[Any]) -> None:
        with self._cond:
            self._cond.notify()

    def _fetch(self, uri: str) -> tuple[Path, int]:
        folder = self.tokenizers.folder(uri)
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return folder, models.estimate_bytes(folder, itemsize)

    def _advance_loads(self) -> None:
        for slot in list(self._slots.values()):
            # Adapters first: copied while the base loads, attached as soon as it is ready.
            for uri, adapter in slot.adapters.items():
                if adapter.state == NEW:
                    adapter.state = FETCHING
                    adapter.future = self._loader.submit(self.tokenizers.folder, uri)
                    adapter.future.add_done_callback(self._wake)
            if slot.state == NEW:
                slot.state = FETCHING
                slot.future = self._loader.submit(self._fetch, slot.key.uri)
                slot.future.add_done_callback(self._wake)
            if slot.state == FETCHING and slot.future is not None and slot.future.done():
                try:
                    slot.folder, slot.estimate = slot.future.result()
                    slot.state = FETCHED
                except Exception as error:
                    self._load_failed(slot, error)
                    continue
            if slot.state == FETCHED:
                if slot.estimate > self.budget:
                    message = (
                        f"the model needs {slot.estimate >> 20} MB; this worker's budget is "
                        f"{self.budget >> 20} MB (INFERENCE_MEMORY_BUDGET_MB)"
                    )
                    self._load_failed(slot, ModelError(503, "insufficient_memory", message))
                    continue
                if self._make_room(slot):
                    assert slot.folder is not None
                    slot.state = LOADING
                    slot.future = self._loader.submit(
                        models.load, slot.key, slot.folder, device=self.device, dtype=self.dtype
                    )
                    slot.future.add_done_callback(self._wake)
            if slot.state == LOADING and slot.future is not None and slot.future.done():
                try:
                    loaded: models.Loaded = slot.future.result()
                except Exception as error:
                    self._load_failed(slot, error)
                    continue
                slot.loaded, slot.state, slot.future = loaded, READY, None
                causal = slot.key.kind == "causal"
                slot.batch = DecodeBatch(loaded, self.outbox) if causal else None
                slot.lane = DecodeBatch(loaded, self.outbox) if causal else None
                self.stats.loads[slot.key.uri] += 1
                for job in slot.pending:
                    job.load_ms += loaded.load_ms
                    job.cold_start()
                if metrics.ENABLED:
                    metrics.MODEL_LOADS.labels(outcome="ok").inc()
                    metrics.MODEL_LOAD_SECONDS.observe(loaded.load_ms / 1000)
                self._gauge_models()
                log.info(
                    "inference.model_loaded",
                    extra={"model": slot.key.uri, "ms": round(loaded.load_ms, 1)},
                )

    def _gauge_models(self) -> None:
        """Models loaded, and the memory their weights (and adapters) hold: set when a
        model or adapter comes or goes, never per request."""
        if not metrics.ENABLED:
            return
        held = [slot.loaded for slot in self._slots.values() if slot.loaded is not None]
        metrics.MODELS_LOADED.set(len(held))
        metrics.WEIGHTS_BYTES.set(sum(loaded.total_bytes for loaded in held))

    def _used(self) -> int:
        total = 0
        for slot in self._slots.values():
            if slot.loaded is not None:
                total += slot.loaded.total_bytes
            elif slot.state == LOADING:
                total += slot.estimate
        return total

    def _make_room(self, slot: Slot) -> bool:
        used = self._used()
        if used + slot.estimate <= self.budget:
            return True
        for other in list(self._slots.values()):  # least recently used first
            if other is slot or other.state != READY or other.refs > 0 or other.loaded is None:
                continue
            used -= other.loaded.total_bytes
            self._evict(other)
            if used + slot.estimate <= self.budget:
                return True
        return False  # everything else is busy: try again when a request ends

    def _evict(self, slot: Slot) -> None:
        log.info("inference.model_evicted", extra={"model": slot.key.uri})
        self.stats.evictions.append(slot.key.uri)
        del self._slots[slot.key]
        slot.loaded = None
        for decoding in (slot.batch, slot.lane):
            if decoding is not None:
                decoding.fail_all()  # idle: empty already; its cache's bytes leave the gauge
        slot.batch = slot.lane = None
        if metrics.ENABLED:
            metrics.MODEL_EVICTIONS.inc()
        self._gauge_models()
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _load_failed(self, slot: Slot, error: BaseException) -> None:
        log.warning("inference.model_load_failed", extra={"model": slot.key.uri}, exc_info=error)
        if not isinstance(error, ModelError):
            error = ModelError(500, "model_load_failed", f"the model could not be loaded: {error}")
        slot.state = FAILED_LOAD
        if metrics.ENABLED:
            metrics.MODEL_LOADS.labels(outcome="failed").inc()
        for job in list(slot.pending):
            self._error(job.request_id, error)
            if error.status in (429, 503):
                metrics.refusal(error.status, error.code)
            self._end(slot, job, REFUSED, None, started=False)
        slot.pending.clear()
        if slot.refs == 0:
            self._slots.pop(slot.key, None)

    def _adapters_ready(self, slot: Slot) -> None:
        """Attach fetched adapters to the loaded base; fail the jobs of broken ones."""
        loaded = slot.loaded
        assert loaded is not None
        attached = False
        for uri, adapter in slot.adapters.items():
            if adapter.state != FETCHING or adapter.future is None or not adapter.future.done():
                continue
            started = time.perf_counter()
            try:
                models.attach_adapter(loaded, uri, adapter.future.result())
                attached = True
                adapter.state = READY
                self.stats.adapter_loads[uri] += 1
            except Exception as error:
                if not isinstance(error, ModelError):
                    error = ModelError(500, "adapter_load_failed", f"the adapter failed: {error}")
                adapter.state, adapter.error = FAILED_LOAD, error
            took = (time.perf_counter() - started) * 1000
            for job in slot.pending:
                if job.adapter_uri == uri:
                    job.load_ms += took
                    job.cold_start()
        for uri, adapter in list(slot.adapters.items()):
            if adapter.state == FAILED_LOAD and adapter.error is not None:
                for job in [j for j in slot.pending if j.adapter_uri == uri]:
                    slot.pending.remove(job)
                    self._error(job.request_id, adapter.error)
                    if adapter.error.status in (429, 503):
                        metrics.refusal(adapter.error.status, adapter.error.code)
                    self._end(slot, job, REFUSED, None, started=False)
                if slot.adapter_refs[uri] == 0:
                    del slot.adapters[uri]
        if self._trim_adapters(slot) or attached:
            self._gauge_models()

    def _trim_adapters(self, slot: Slot) -> bool:
        """Detach idle adapters past `max_adapters`; whether any was."""
        loaded = slot.loaded
        assert loaded is not None
        excess = len(loaded.adapters) - self.settings.max_adapters
        detached = False
        for uri in list(loaded.adapters):  # least recently used first
            if excess <= 0:
                break
            if slot.adapter_refs[uri] == 0:
                models.detach_adapter(loaded, uri)
                slot.adapters.pop(uri, None)
                excess -= 1
                detached = True
        return detached

    # -- serving ----------------------------------------------------------------------

    def _ready(self, slot: Slot, job: Job) -> bool:
        if job.adapter_uri is None:
            return True
        adapter = slot.adapters.get(job.adapter_uri)
        return adapter is not None and adapter.state == READY

    def _begin(self, slot: Slot, job: Job) -> None:
        self.outbox.send(job.request_id, START, job.start_data())
        slot.active.add(job)
        loaded = slot.loaded
        if job.adapter_uri and loaded is not None and job.adapter_uri in loaded.adapters:
            loaded.adapters.move_to_end(job.adapter_uri)
        with self._cond:
            self._waiting -= 1

    def _serve(self, slot: Slot, incoming: int) -> tuple[bool, float | None]:
        if slot.adapters:
            self._adapters_ready(slot)
        worked = False
        wake_in: float | None = None
        if any(not j.generating for j in slot.pending):
            worked = self._encode(slot)
        batch, lane = slot.batch, slot.lane
        if batch is None or lane is None:
            return worked, wake_in
        ready = [j for j in slot.pending if j.generating and self._ready(slot, j)]
        live = [j for j in ready if not _is_batch(j)]
        did, wait = self._join(slot, batch, live, self.settings.max_batch - len(batch), incoming)
        worked = worked or did
        if len(batch):
            self._step(slot, batch)
            return True, wait
        if live or self._live_now:  # live work waits here or runs on another model
            return worked, wait
        now = time.monotonic()
        # No live generation runs or waits: the batch lane's turn, a step at a time (the
        # next iteration looks for live arrivals first). While live traffic ran in the
        # last BATCH_QUIET_SECONDS, only a few lane rows: their forwards are short.
        quiet_in = self._live_at + BATCH_QUIET_SECONDS - now
        limit = self.settings.max_batch if quiet_in <= 0 else BATCH_ROWS_BUSY
        queued = [j for j in ready if _is_batch(j)]
        did, lane_wait = self._join(slot, lane, queued, limit - len(lane), incoming)
        worked = worked or did
        if queued and quiet_in > 0:  # held back: look again once quiet
            lane_wait = quiet_in if lane_wait is None else min(lane_wait, quiet_in)
        if len(lane):
            self._step(slot, lane)
            worked = True
        waits = [w for w in (wait, lane_wait) if w is not None]
        return worked, min(waits) if waits else None

    def _join(
        self, slot: Slot, batch: DecodeBatch, ready: list[Job], room: int, incoming: int
    ) -> tuple[bool, float | None]:
        """Admit `ready` jobs into `batch` (a prefill) if it is time; whether it did, and
        when to look again if it waits for more."""
        settings = self.settings
        if not ready or room <= 0 or not (batch.joinable or not len(batch)):
            return False, None
        rows = sum(j.rows_left for j in ready)
        age = time.monotonic() - min(j.received for j in ready)
        if not len(batch):
            wait_s = settings.batch_wait_ms / 1000
            if incoming > 0 and rows < settings.max_batch and age < wait_s:
                return False, wait_s - age  # more are being tokenized: start them together
        elif not (
            # Joining a running batch costs a prefill forward (and a copy of the
            # cache): gather arrivals for a few ms, unless enough are waiting.
            age >= settings.join_wait_ms / 1000 or rows >= room or rows >= max(1, len(batch) // 4)
        ):
            return False, None
        self._admit(slot, batch, ready, room)
        return True, None

    def _step(self, slot: Slot, batch: DecodeBatch) -> None:
        self.stats.steps += 1
        self.stats.peak_rows = max(self.stats.peak_rows, len(batch))
        if metrics.ENABLED:  # the one metric a step moves
            metrics.BATCH_SIZE.observe(len(batch))
        self._finished(slot, batch, batch.step())

    def _admit(self, slot: Slot, batch: DecodeBatch, ready: list[Job], room: int) -> None:
        chosen: list[Job] = []
        rows = 0
        width = 0
        for job in ready:
            need = job.rows_left
            longest = max(width, *(len(p) for p in job.prepared.prompts))
            prompts = sum(len(j.prepared.prompts) for j in chosen) + len(job.prepared.prompts)
            # The first job of an empty batch always goes, whatever its size.
            if (chosen or len(batch)) and rows + need > room:
                break
            if chosen and longest * prompts > self.settings.max_prefill_tokens:
                break
            chosen.append(job)
            rows += need
            width = longest
        for job in chosen:
            slot.pending.remove(job)
            self._begin(slot, job)
        items = [(job, i) for job in chosen for i in range(len(job.prepared.prompts))]
        self.stats.prefills += 1
        finished = batch.prefill(items)
        now = time.monotonic()
        for job in chosen:  # every prompt of a chosen job was prefilled: its first tokens
            job.first(now)
        self._finished(slot, batch, finished)
        # The first tokens (time to first token) go now, not after this iteration's step.
        self.outbox.flush()

    def _finished(self, slot: Slot, batch: DecodeBatch, rows: list[Row]) -> None:
        for row in rows:
            job = row.job
            choice: dict[str, Any] = {
                "index": row.index,
                "text": batch.final_text(row),
                "finish_reason": row.finish,
            }
            if row.logprobs is not None:
                choice["logprobs"] = row.logprobs
            job.choices[row.index] = choice
            job.completion_tokens += len(row.tokens)
            job.rows_left -= 1
            if job.rows_left == 0:
                status = job.status()
                data = {"choices": job.choices, "usage": job.usage_data()}
                self.outbox.send(job.request_id, DONE, data)
                self._end(slot, job, COMPLETED, job.usage(status), started=True)

    def _encode(self, slot: Slot) -> bool:
        loaded = slot.loaded
        assert loaded is not None
        limit = self.settings.max_encode_batch
        items: list[tuple[Job, int]] = []
        for job in [j for j in slot.pending if not j.generating and self._ready(slot, j)]:
            if len(items) >= limit:
                break
            if job.started is None:
                self._begin(slot, job)
            count = min(limit - len(items), len(job.prepared.prompts) - job.encode_next)
            items += [(job, job.encode_next + k) for k in range(count)]
            job.encode_next += count
            if job.encode_next == len(job.prepared.prompts):
                slot.pending.remove(job)
        if not items:
            return False
        order = sorted(
            range(len(items)), key=lambda k: len(items[k][0].prepared.prompts[items[k][1]])
        )
        ids = [items[k][0].prepared.prompts[items[k][1]] for k in order]
        names = [items[k][0].adapter for k in order]
        if slot.key.kind == models.CLASSIFIER:
            result = classify(loaded, ids, names)
        else:
            result = embed(loaded, ids, names)
        for position, k in enumerate(order):
            job, index = items[k]
            job.outputs[index] = result[position]
        for job in {job for job, _ in items}:
            if job.encode_next == len(job.prepared.prompts) and job not in slot.pending:
                self._encoded(slot, job)
        return True

    def _encoded(self, slot: Slot, job: Job) -> None:
        loaded = slot.loaded
        assert loaded is not None
        job.first(time.monotonic())
        stacked = torch.stack(job.outputs)
        usage = job.usage_data()
        if job.request.kind == "embedding":
            vectors = truncate(stacked, job.request.params.dimensions)
            data: dict[str, Any] = {"embeddings": vectors.cpu().tolist(), "usage": usage}
        else:
            labels = job.request.model.labels
            if len(labels) != stacked.shape[-1]:
                labels = loaded.labels or tuple(str(i) for i in range(stacked.shape[-1]))
            results = []
            for probs in stacked.cpu().tolist():
                best = max(range(len(probs)), key=probs.__getitem__)
                results.append(
                    {
                        "label": labels[best],
                        "score": probs[best],
                        "scores": dict(zip(labels, probs, strict=True)),
                    }
                )
            data = {"classifications": results, "usage": usage}
        self.outbox.send(job.request_id, DONE, data)
        self._end(slot, job, COMPLETED, job.usage("completed"), started=True)

    # -- endings ----------------------------------------------------------------------

    def _end(self, slot: Slot, job: Job, outcome: str, usage: Any, *, started: bool) -> None:
        if usage is not None and metrics.ENABLED:  # ran: counted as its usage is reported
            metrics.request_ended(
                job.request.kind, usage.status, usage.prompt_tokens, usage.completion_tokens
            )
        _log_request(job.request, outcome, usage, job)
        self.outbox.unwatch(job.request_id)
        slot.active.discard(job)
        slot.refs -= 1
        if job.adapter_uri:
            slot.adapter_refs[job.adapter_uri] -= 1
        if not started:
            with self._cond:
                self._waiting -= 1
        job.ticket.resolve(outcome, usage)

    def _crash(self, slot: Slot, error: BaseException) -> None:
        """A forward failed: every request running on this model fails, billed for what
        it produced; the model stays loaded for the next ones."""
        for decoding in (slot.batch, slot.lane):
            if decoding is not None:
                for row in decoding.fail_all():
                    row.job.completion_tokens += len(row.tokens)
        oom = isinstance(error, torch.OutOfMemoryError)
        failure = (
            ModelError(503, "out_of_memory", "the worker ran out of memory: retry with less")
            if oom
            else ModelError(500, "inference_failed", "the model failed on this request")
        )
        for job in list(slot.active):
            if job in slot.pending:  # an encoding job with inputs still to go
                slot.pending.remove(job)
            if oom:
                metrics.refusal(failure.status, failure.code)
            self._fail_started(slot, job, failure)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _fail_everything(self) -> None:
        failure = ModelError(500, "inference_failed", "the inference engine failed")
        for slot in list(self._slots.values()):
            for decoding in (slot.batch, slot.lane):
                if decoding is not None:
                    for row in decoding.fail_all():
                        row.job.completion_tokens += len(row.tokens)
            for job in list(slot.active):
                self._fail_started(slot, job, failure)
            for job in [j for j in slot.pending if j.started is None]:
                self._error(job.request_id, failure)
                self._end(slot, job, REFUSED, None, started=False)
            slot.pending.clear()


def _is_batch(job: Job) -> bool:
    return job.request_id.startswith(BATCH_REQUEST_PREFIX)


def _log_request(
    request: InferenceRequest,
    outcome: str,
    usage: Any,
    job: Job | None = None,
    *,
    code: str | None = None,
) -> None:
    """The request's one line (`inference.request`): who, which model, how it ended and
    how long it waited, never its text. Through `extra=`: the engine's thread serves
    many requests at once, so nothing is bound to it."""
    if not log.isEnabledFor(logging.INFO):
        return
    fields: dict[str, Any] = {
        "request_id": request.request_id,
        "trace_id": request.trace_id,
        "organization_id": request.organization_id,
        "api_key_id": request.api_key_id,
        "model": request.model.id,
        "kind": request.kind,
        "outcome": usage.status if usage is not None else outcome,
    }
    if code is not None:
        fields["error_code"] = code
    if job is None:
        log.info("inference.request", extra=fields)
        return
    fields["prompt_tokens"] = job.prepared.prompt_tokens
    fields["completion_tokens"] = job.completion_tokens
    if job.started is not None:
        fields["queue_ms"] = round((job.started - job.received) * 1000 - job.load_ms, 1)
        if job.load_ms:
            fields["load_ms"] = round(job.load_ms, 1)
    if job.first_at is not None:
        fields["ttft_ms"] = round((job.first_at - job.received) * 1000, 1)
    if usage is not None:
        fields["latency_ms"] = usage.latency_ms
    log.info("inference.request", extra=fields)


__all__ = ["BASE", "Engine", "Settings", "Stats"]
