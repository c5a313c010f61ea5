"""Requests from the Redis list straight into the engine (see `jobcontracts.inference`).

One thread per inference worker BRPOPs `request_queue(queue)` (then RPOPs what
else is waiting, up to its room) and submits each burst to the engine together,
holding at most `capacity` requests at once: past that it
stops taking, and the rest wait in Redis for any worker with room (the gateway
refuses more than INFERENCE_MAX_QUEUED waiting, with a 503).

Batch API requests wait in a second, low-priority list (`batch_queue`): BRPOP
reads the live list first, so a batch request is taken only when no live one
waits. At most `batch_capacity` of them are held at once while the worker has
no live request (for BATCH_QUIET_SECONDS), and `batch_capacity_busy` while it
has: a batch fills an idle engine, and steps aside (its requests are short)
once live traffic comes, leaving the engine's rows and steps to it. The engine
keeps them apart too (`scheduler.Engine._serve`): batch rows decode in their own
lane, stepped only while no live generation runs or waits, and the batch requests
held beyond its rows wait in the engine, tokenized, to start as rows end. A request taken by
a worker that then dies is not redelivered: its caller's gateway sees the reply
channel go silent and answers a clean 503 (`worker_lost`), billed for nothing
it did not report.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import orjson

from jobcontracts.inference import ERROR, InferenceRequest, batch_queue, request_queue

log = logging.getLogger(__name__)

#: Requests taken off the list in one go (one BRPOP, then one RPOP of the rest).
BURST = 64
#: How long after its last live request a worker counts as idle (batch room grows).
BATCH_QUIET_SECONDS = 0.5


class _BatchRoom:
    """Room for batch requests: `idle` of them while no live request is held (nor was
    for BATCH_QUIET_SECONDS), else `busy`."""

    def __init__(self, idle: int, busy: int) -> None:
        self.idle, self.busy = idle, min(busy, idle)
        self.held = 0
        self.live = 0
        self.live_at = 0.0
        self._lock = threading.Lock()

    def acquire(self, blocking: bool = False) -> bool:
        with self._lock:
            quiet = not self.live and time.monotonic() - self.live_at > BATCH_QUIET_SECONDS
            if self.held >= (self.idle if quiet else self.busy):
                return False
            self.held += 1
            return True

    def release(self) -> None:
        with self._lock:
            self.held -= 1

    def live_taken(self, count: int) -> None:
        with self._lock:
            self.live += count
            self.live_at = time.monotonic()

    def live_done(self) -> None:
        with self._lock:
            self.live -= 1
            self.live_at = time.monotonic()


class Intake:
    def __init__(
        self,
        *,
        url: str,
        queue: str,
        capacity: int,
        engine: Callable[[], Any],
        before_first: Callable[[], None] = lambda: None,
        batch_capacity: int | None = None,
        batch_capacity_busy: int = 1,
    ) -> None:
        self.url = url
        self.key = request_queue(queue)
        self.batch_key = batch_queue(queue).encode()
        self.capacity = max(1, capacity)
        #: Batch requests held at once (never more than the capacity).
        # Unset: three quarters of the capacity (48 of 64: the engine's 32 rows and the
        # next cohort, tokenized and waiting in the engine to start the moment rows end),
        # leaving the rest for live requests.
        idle = self.capacity - self.capacity // 4 if batch_capacity is None else batch_capacity
        self._batch_room = _BatchRoom(min(self.capacity, max(0, idle)), max(0, batch_capacity_busy))
        self._engine = engine
        self._before_first = before_first
        self._room = threading.Semaphore(self.capacity)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="inference-intake", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        import redis

        client: Any = redis.Redis.from_url(self.url, socket_keepalive=True)
        self._before_first()  # the engine and model code, before taking anything
        backoff = 0.1
        while not self._stop.is_set():
            if not self._room.acquire(timeout=1.0):
                continue
            batch = self._batch_room.acquire(blocking=False)
            keys = [self.key, self.batch_key] if batch else [self.key]
            try:
                # Without batch room, wake often: a batch request ending is no Redis event.
                item = client.brpop(keys, timeout=1 if batch else 0.05)
            except Exception:  # Redis restarted or unreachable: retry, never die
                self._room.release()
                if batch:
                    self._batch_room.release()
                log.exception("inference.intake_failed")
                time.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            backoff = 0.1
            if batch and (item is None or item[0] != self.batch_key):
                self._batch_room.release()
            if item is None:
                self._room.release()
                continue
            if item[0] == self.batch_key:
                self._take([item[1], *self._more_batch(client)], batch=True)
                continue
            self._take([item[1], *self._more(client)])

    def _more(self, client: Any) -> list[bytes]:
        """Whatever else is waiting, up to the room left, in one more round trip: a burst
        of requests is tokenized and handed to the engine together."""
        extra = 0
        while extra < BURST - 1 and self._room.acquire(blocking=False):
            extra += 1
        if not extra:
            return []
        try:
            more: list[bytes] = client.rpop(self.key, extra) or []
        except Exception:
            log.exception("inference.intake_failed")
            more = []
        for _ in range(extra - len(more)):
            self._room.release()
        return more

    def _more_batch(self, client: Any) -> list[bytes]:
        """More batch requests, up to the batch room left (no live request was waiting)."""
        extra = 0
        while extra < BURST - 1 and self._room.acquire(blocking=False):
            if not self._batch_room.acquire(blocking=False):
                self._room.release()
                break
            extra += 1
        if not extra:
            return []
        try:
            more: list[bytes] = client.rpop(self.batch_key, extra) or []
        except Exception:
            log.exception("inference.intake_failed")
            more = []
        for _ in range(extra - len(more)):
            self._release_batch()
        return more

    def _take(self, raws: list[bytes], *, batch: bool = False) -> None:
        engine = self._engine()
        requests: list[InferenceRequest] = []
        for raw in raws:
            try:
                requests.append(InferenceRequest.from_json(orjson.loads(raw)))
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as error:
                (self._release_batch if batch else self._room.release)()
                self._refuse(engine, raw, error)
        if not requests:
            return
        release = self._release_batch if batch else self._release_live
        if not batch:
            self._batch_room.live_taken(len(requests))
        try:
            tickets = engine.submit_many(requests)
        except Exception as error:  # whatever it was, the callers hear now, not at timeout
            log.exception("inference.requests_crashed", extra={"requests": len(requests)})
            data = {
                "status": 500,
                "code": "inference_failed",
                "message": f"inference failed: {error}",
            }
            with engine.outbox.batched():
                for request in requests:
                    release()
                    _answer(engine, request.request_id, request.reply_to, data)
            return
        for ticket in tickets:
            ticket.add_done_callback(lambda _ticket: release())

    def _release_batch(self) -> None:
        self._batch_room.release()
        self._room.release()

    def _release_live(self) -> None:
        self._batch_room.live_done()
        self._room.release()

    @staticmethod
    def _refuse(engine: Any, raw: bytes, error: Exception) -> None:
        try:
            payload = orjson.loads(raw)
        except orjson.JSONDecodeError:
            payload = None
        request_id = payload.get("request_id") if isinstance(payload, dict) else None
        log.error(
            "inference.invalid_request", extra={"request_id": request_id, "error": str(error)}
        )
        if isinstance(request_id, str):
            reply_to = payload.get("reply_to") if isinstance(payload, dict) else None
            data = {
                "status": 400,
                "code": "invalid_request",
                "message": f"invalid request: {error}",
            }
            _answer(engine, request_id, reply_to if isinstance(reply_to, str) else None, data)


def _answer(engine: Any, request_id: str, reply_to: str | None, error: dict[str, Any]) -> None:
    """A request the engine never took: its error reply, and its end (nothing to bill)."""
    engine.outbox.route(request_id, reply_to)
    engine.outbox.send(request_id, ERROR, error)
    engine.outbox.finish(request_id, None)
