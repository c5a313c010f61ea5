"""A request inside the engine (`Job`), and the `Ticket` that says when and how it ended."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from gpuworkers import metrics
from gpuworkers.inference.models import ModelKey, adapter_name
from gpuworkers.inference.prepare import Prepared
from jobcontracts.inference import (
    BATCH_REQUEST_PREFIX,
    CANCELLED,
    InferenceRequest,
    UsageReport,
)

BASE = "__base__"  # PEFT's name for "no adapter" in a mixed batch

#: How a request ended, as far as its task is concerned.
COMPLETED = "completed"
FAILED = "failed"  # ran, then failed part-way: billed for what it used
REFUSED = "refused"  # an error before anything ran (bad input, unloadable model)
OVERLOADED = "overloaded"
DROPPED = "dropped"  # past its deadline, or cancelled before it started: no reply


class Ticket:
    """Resolved once by the engine, when its request ends (with its usage, if it ran).

    Callbacks run on the resolving thread (often the engine's): they must not block.
    """

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.outcome = ""
        self.usage: UsageReport | None = None
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._callbacks: list[Callable[[Ticket], None]] = []

    def resolve(self, outcome: str, usage: UsageReport | None = None) -> None:
        with self._lock:
            if self._event.is_set():
                return
            self.outcome = outcome
            self.usage = usage
            self._event.set()
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback(self)

    def add_done_callback(self, callback: Callable[[Ticket], None]) -> None:
        """Call `callback(ticket)` once it resolves (at once if it already has)."""
        with self._lock:
            if not self._event.is_set():
                self._callbacks.append(callback)
                return
        callback(self)

    @property
    def done(self) -> bool:
        return self._event.is_set()

    def wait(self, timeout: float | None = None) -> UsageReport | None:
        if not self._event.wait(timeout):
            raise TimeoutError(f"inference request {self.request_id} still running")
        return self.usage


class Job:
    """One request, from `submit` to its last reply."""

    def __init__(self, request: InferenceRequest, prepared: Prepared, ticket: Ticket) -> None:
        self.request = request
        self.request_id = request.request_id
        self.prepared = prepared
        self.ticket = ticket
        self.key: ModelKey = prepared.key
        self.adapter_uri = prepared.adapter_uri
        self.adapter = adapter_name(prepared.adapter_uri) if prepared.adapter_uri else BASE
        self.received = time.monotonic()
        self.received_at = time.time()
        self.started: float | None = None
        #: When its first token (or its result) was ready (monotonic), for its log line.
        self.first_at: float | None = None
        self.load_ms = 0.0
        #: Counted as a cold start already (its model, or its adapter, had to load).
        self.cold = False
        params = request.params
        self.n = max(1, params.n) if request.kind in ("chat", "completion") else 1
        self.rows_left = len(prepared.prompts) * self.n
        self.choices: list[dict[str, Any] | None] = [None] * self.rows_left
        self.completion_tokens = 0
        self.cancelled = False
        # Encoding: inputs done so far, and their results.
        self.encode_next = 0
        self.outputs: list[Any] = [None] * len(prepared.prompts)

    @property
    def generating(self) -> bool:
        return self.request.kind in ("chat", "completion")

    def expired(self, now_wall: float) -> bool:
        deadline = self.request.deadline
        return bool(deadline) and now_wall > deadline

    def start_data(self) -> dict[str, Any]:
        now = time.monotonic()
        self.started = now
        queue_ms = (now - self.received) * 1000 - self.load_ms
        data: dict[str, Any] = {
            "queue_ms": round(queue_ms, 3),
            "load_ms": round(self.load_ms, 3),
        }
        broker_ms = 0.0
        if self.request.sent_at:
            # Across hosts this includes clock skew; on one host it is the broker's delay.
            broker_ms = (self.received_at - self.request.sent_at) * 1000
            data["broker_ms"] = round(broker_ms, 3)
        if metrics.ENABLED:
            # From the gateway's send to the start here, the model's loading left out (as
            # the gateway's x-atelier-queue-ms): the lane says whose wait it was.
            batch = self.request_id.startswith(BATCH_REQUEST_PREFIX)
            metrics.queue_waited(batch, (max(0.0, broker_ms) + queue_ms) / 1000)
        return data

    def first(self, now: float) -> None:
        """Its first token (or its result) is ready: time to first token, once."""
        if self.first_at is None:
            self.first_at = now
            if metrics.ENABLED:
                metrics.first_token(self.request.kind, now - self.received)

    def cold_start(self) -> None:
        """It waits for its model or adapter to load: counted once, whichever it was."""
        if not self.cold:
            self.cold = True
            if metrics.ENABLED:
                metrics.cold_start(self.request.kind)

    def usage(self, status: str) -> UsageReport:
        request = self.request
        since = request.sent_at or self.received_at
        return UsageReport(
            request_id=request.request_id,
            organization_id=request.organization_id,
            api_key_id=request.api_key_id,
            model=request.model.id,
            kind=request.kind,
            prompt_tokens=self.prepared.prompt_tokens,
            completion_tokens=self.completion_tokens,
            status=status,
            latency_ms=round(max(0.0, time.time() - since) * 1000, 3),
            at=time.time(),
            trace_id=request.trace_id,
        )

    def usage_data(self) -> dict[str, int]:
        prompt = self.prepared.prompt_tokens
        return {
            "prompt_tokens": prompt,
            "completion_tokens": self.completion_tokens,
            "total_tokens": prompt + self.completion_tokens,
        }

    def status(self) -> str:
        if any(c is not None and c.get("finish_reason") == CANCELLED for c in self.choices):
            return "cancelled"
        return "completed"
