"""Where an inference worker's replies and usage reports go, and where it reads cancellations.

With `REDIS_URL` set, replies are published on the Redis pub/sub channel
`reply_channel(request_id, reply_to)` (the gateway process's channel, or the
request's own), a request's usage report is an entry on the stream
`USAGE_STREAM`, and a cancellation is the Redis key `cancel_key(request_id)`.
Embedded (no Redis), replies are JSON lines appended to
`{data_dir}/replies/{request_id}.jsonl`, usage reports are Celery tasks on the
control queue, and a cancellation is a file named `cancel_key(request_id)` in
that folder. See `jobcontracts.inference`.

The scheduler never waits on the network: it hands replies to an `Outbox`,
whose thread publishes everything that is waiting in one pipelined round trip
and polls the cancel keys of the requests it watches (one MGET) every few ms.
A stream's deltas after its first may be merged over a few ms
(`stream_interval_s`): one message per a few tokens instead of one per token.
A request's end (`finish`) travels the same queue behind its last reply: it
carries the usage report, and forgets the request's route.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any, Protocol, TypedDict

import orjson

from jobcontracts.broker import data_dir
from jobcontracts.inference import (
    DELTA,
    DONE,
    ERROR,
    HEARTBEAT,
    START,
    USAGE_STREAM,
    Reply,
    UsageReport,
    cancel_key,
    reply_channel,
)

log = logging.getLogger(__name__)

#: One message: (request_id, reply type, data).
Message = tuple[str, str, dict[str, Any]]
#: Not a reply: the request has ended; data {"usage": UsageReport JSON or None}.
END = "end"


class OutboxOptions(TypedDict, total=False):
    """`Outbox`'s timing, in seconds (also what a `ProcessOutbox` hands its child)."""

    cancel_check_s: float
    heartbeat_s: float
    stream_interval_s: float
    stream_interval_max_s: float


#: Streams open at which a stream's merge interval starts to grow (see `Outbox`).
STREAMS_PER_INTERVAL = 8


def wire(request_id: str, kind: str, data: dict[str, Any]) -> dict[str, Any]:
    """A `Reply` as sent, without `dataclasses.asdict` (which deep-copies every delta)."""
    return {"type": kind, "request_id": request_id, "data": data}


def encode(request_id: str, kind: str, data: dict[str, Any]) -> bytes:
    return orjson.dumps(wire(request_id, kind, data))


class ReplyChannel(Protocol):
    #: request id → its gateway's reply channel, for requests that named one.
    routes: dict[str, str]

    def publish(self, messages: list[Message]) -> None:
        """Replies in order; an END message carries a usage report (or None) and ends
        the request's route."""
        ...

    def cancelled(self, request_ids: Collection[str]) -> set[str]: ...

    def close(self) -> None: ...


class RedisChannel:
    """Redis pub/sub replies, usage reports on a Redis stream, Redis-key cancellations."""

    def __init__(self, url: str) -> None:
        import redis

        self.url = url
        self.client: Any = redis.Redis.from_url(url, socket_keepalive=True)
        self.routes: dict[str, str] = {}

    def publish(self, messages: list[Message]) -> None:
        # One round trip for everything waiting: replies of many requests, and the usage
        # reports of those that ended (after their last reply, in the same pipeline).
        # Replies for one gateway process go as one message (a JSON array): at 32
        # streams that is one PUBLISH, and one message for the gateway to read, per
        # flush instead of 32.
        pipe = self.client.pipeline(transaction=False)
        ended: list[str] = []
        usage: list[bytes] = []
        batches: dict[str, list[dict[str, Any]]] = {}
        for request_id, kind, data in messages:
            if kind == END:
                ended.append(request_id)
                if data.get("usage") is not None:
                    usage.append(orjson.dumps(data["usage"]))
                continue
            route = self.routes.get(request_id)
            if route is None:  # a request of its own channel: one reply per message
                pipe.publish(reply_channel(request_id), encode(request_id, kind, data))
                continue
            batches.setdefault(route, []).append(wire(request_id, kind, data))
        for route, replies in batches.items():
            pipe.publish(route, orjson.dumps(replies[0] if len(replies) == 1 else replies))
        for report in usage:
            pipe.xadd(USAGE_STREAM, {"report": report})
        pipe.execute()
        for request_id in ended:  # only once sent: a retried batch must route the same way
            self.routes.pop(request_id, None)

    def cancelled(self, request_ids: Collection[str]) -> set[str]:
        ids = list(request_ids)
        if not ids:
            return set()
        values = self.client.mget([cancel_key(request_id) for request_id in ids])
        return {request_id for request_id, value in zip(ids, values, strict=True) if value}

    def close(self) -> None:
        self.client.close()


def send_usage_task(usage: dict[str, Any]) -> None:
    """Embedded: a usage report is a Celery task on the control queue."""
    from gpuworkers.celery import app
    from jobcontracts import queues

    app.send_task(queues.CONTROL_USAGE_REPORT, args=[usage], queue=queues.CONTROL)


class FileChannel:
    """Embedded: one JSON-lines file of replies per request, cancellation by file."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.routes: dict[str, str] = {}
        folder.mkdir(parents=True, exist_ok=True)

    def publish(self, messages: list[Message]) -> None:
        lines: dict[str, list[bytes]] = defaultdict(list)
        usage: list[dict[str, Any]] = []
        for request_id, kind, data in messages:
            if kind == END:
                if data.get("usage") is not None:
                    usage.append(data["usage"])
                continue
            lines[request_id].append(encode(request_id, kind, data) + b"\n")
        for request_id, chunk in lines.items():
            # One write per request and batch: a tailing reader never sees half a line
            # (O_APPEND writes of a few KB are atomic on local filesystems).
            with (self.folder / f"{request_id}.jsonl").open("ab") as out:
                out.write(b"".join(chunk))
        for report in usage:
            send_usage_task(report)

    def cancelled(self, request_ids: Collection[str]) -> set[str]:
        return {r for r in request_ids if (self.folder / cancel_key(r)).exists()}

    def close(self) -> None:
        pass


class MemoryChannel:
    """In-process replies for tests and the bare benchmark: kept per request, in order."""

    def __init__(self) -> None:
        self.replies: dict[str, list[Reply]] = defaultdict(list)
        self.usage: list[UsageReport] = []
        self.routes: dict[str, str] = {}
        self.cancels: set[str] = set()
        self.lock = threading.Condition()
        #: Called (on the outbox thread) with each reply as it is published.
        self.listeners: list[Callable[[Reply], None]] = []

    def publish(self, messages: list[Message]) -> None:
        with self.lock:
            for request_id, kind, data in messages:
                if kind == END:
                    if data.get("usage") is not None:
                        self.usage.append(UsageReport.from_json(data["usage"]))
                    continue
                # Through the wire format, as the gateway would read it.
                reply = Reply.from_json(orjson.loads(encode(request_id, kind, data)))
                self.replies[request_id].append(reply)
                for listener in self.listeners:
                    listener(reply)
            self.lock.notify_all()

    def cancelled(self, request_ids: Collection[str]) -> set[str]:
        with self.lock:
            return self.cancels.intersection(request_ids)

    def cancel(self, request_id: str) -> None:
        with self.lock:
            self.cancels.add(request_id)

    def wait_final(self, request_id: str, timeout: float = 60) -> Reply:
        """The request's done or error reply, waiting for it."""
        deadline = time.monotonic() + timeout
        with self.lock:
            while True:
                found = [r for r in self.replies[request_id] if r.type in ("done", "error")]
                if found:
                    return found[-1]
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no final reply for {request_id}")
                self.lock.wait(left)

    def close(self) -> None:
        pass


def channel_from_env(environ: Mapping[str, str] | None = None) -> ReplyChannel:
    env = os.environ if environ is None else environ
    url = env.get("REDIS_URL")
    if url:
        return RedisChannel(url)
    return FileChannel(data_dir(env) / "replies")


class Outbox:
    """A thread that publishes replies and watches cancel keys for the scheduler.

    `send` never blocks on I/O. `cancelled` is replaced (never mutated) by the
    thread, so the scheduler reads it without a lock.
    """

    def __init__(
        self,
        channel: ReplyChannel,
        *,
        cancel_check_s: float = 0.005,
        heartbeat_s: float = 5.0,
        stream_interval_s: float = 0.0,
        stream_interval_max_s: float = 0.0,
        on_cancelled: Callable[[frozenset[str]], None] | None = None,
    ) -> None:
        self.channel = channel
        #: With more than `STREAMS_PER_INTERVAL` streams open, the interval grows with
        #: their number, up to this: fewer, larger messages when the worker is busiest.
        self.stream_interval_max_s = max(stream_interval_s, stream_interval_max_s)
        #: Called (on the outbox thread) whenever the set of cancelled requests changes.
        self.on_cancelled = on_cancelled
        self.cancel_check_s = cancel_check_s
        self.heartbeat_s = heartbeat_s
        #: A request's deltas after its first are published at most this often, merged.
        self.stream_interval_s = stream_interval_s
        self._streaming: set[str] = set()
        #: Started requests (not yet done) and when each was last sent anything.
        self._last: dict[str, float] = {}
        self.cancelled: frozenset[str] = frozenset()
        self._queue: queue.SimpleQueue[Message | None] = queue.SimpleQueue()
        self._watched: set[str] = set()
        self._watch_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="inference-outbox", daemon=True)
        self._started = False

    def start(self) -> None:
        if not self._started:
            self._started = True
            self._thread.start()

    def send(self, request_id: str, kind: str, data: dict[str, Any]) -> None:
        if kind in (DONE, ERROR):
            self._last.pop(request_id, None)
        elif kind == START or request_id in self._last:
            self._last[request_id] = time.monotonic()
        self._queue.put((request_id, kind, data))

    def send_many(self, messages: list[Message]) -> None:
        for request_id, kind, data in messages:
            self.send(request_id, kind, data)

    def flush(self) -> None:
        """See `ProcessOutbox.flush`: nothing is held here."""

    def batched(self) -> contextlib.AbstractContextManager[None]:
        """`ProcessOutbox` groups a thread's calls into one write; here every call is a
        queue put already."""
        return contextlib.nullcontext()

    def route(self, request_id: str, reply_to: str | None) -> None:
        """Send this request's replies to `reply_to` (its gateway process's channel)."""
        if reply_to:
            self.channel.routes[request_id] = reply_to

    def finish(self, request_id: str, usage: UsageReport | None) -> None:
        """The request has ended: after its last reply, report its usage (if it ran)."""
        self._last.pop(request_id, None)
        data = {"usage": usage.to_json() if usage is not None else None}
        self._queue.put((request_id, END, data))

    def watch(self, request_id: str) -> None:
        with self._watch_lock:
            self._watched.add(request_id)

    def unwatch(self, request_id: str) -> None:
        with self._watch_lock:
            self._watched.discard(request_id)

    def close(self, timeout: float = 5.0) -> None:
        if self._started:
            self._queue.put(None)
            self._thread.join(timeout)
        self.channel.close()

    def _run(self) -> None:
        last_check = last_beat = next_flush = 0.0
        pending: list[Message] = []
        #: Requests with something urgent waiting: sent at once, their earlier deltas with
        #: it. Other streams' later deltas wait for the flush (at 32 requests something is
        #: urgent nearly every step: flushing all of it then sent one delta per token).
        hot: set[str] = set()
        while True:
            stop = False
            now = time.monotonic()
            if pending:
                timeout = 0.0 if hot else max(0.0, next_flush - now)
            else:
                # Idle (nothing to watch): sleep longer; a new request's first reply wakes us.
                timeout = self.cancel_check_s if self._watched else min(0.5, self.heartbeat_s)
            try:
                item = self._queue.get(timeout=timeout)
                while item is not None:  # everything already waiting goes in one round trip
                    pending.append(item)
                    if self._urgent(item):
                        hot.add(item[0])
                    item = self._queue.get_nowait()
                stop = True
            except queue.Empty:
                pass
            now = time.monotonic()
            if pending and (stop or now >= next_flush):
                self._publish(self._merge(pending))
                pending = []
                hot.clear()
                next_flush = now + self._interval()
            elif hot:
                self._publish(self._merge([m for m in pending if m[0] in hot]))
                pending = [m for m in pending if m[0] not in hot]
                hot.clear()
            if stop:
                return
            now = time.monotonic()
            if now - last_check >= self.cancel_check_s:
                last_check = now
                self._poll_cancels()
            if now - last_beat >= min(1.0, self.heartbeat_s / 2):
                last_beat = now
                self._heartbeats(now)

    def _interval(self) -> float:
        """How long later deltas wait to be merged: `stream_interval_s`, longer (up to
        `stream_interval_max_s`) as more streams are open than `STREAMS_PER_INTERVAL`."""
        load = len(self._streaming) / STREAMS_PER_INTERVAL
        return min(self.stream_interval_max_s, self.stream_interval_s * max(1.0, load))

    def _publish(self, batch: list[Message]) -> None:
        for attempt in range(3):
            try:
                self.channel.publish(batch)
                return
            except Exception:  # a dropped connection: redis-py reconnects on the next call
                log.exception("inference.reply_publish_failed", extra={"attempt": attempt})
                time.sleep(0.05 * (attempt + 1))

    def _urgent(self, message: Message) -> bool:
        """Everything but a request's later deltas is published at once: start, done,
        errors, and the first delta (time to first token)."""
        request_id, kind, _ = message
        if kind != DELTA:
            self._streaming.discard(request_id)
            return True
        if request_id in self._streaming:
            return False
        self._streaming.add(request_id)
        return True

    @staticmethod
    def _merge(messages: list[Message]) -> list[Message]:
        """Deltas of one choice that waited together become one (text and logprobs joined)."""
        out: list[Message] = []
        open_deltas: dict[tuple[str, int], dict[str, Any]] = {}
        for request_id, kind, data in messages:
            if kind != DELTA:
                out.append((request_id, kind, data))
                continue
            key = (request_id, int(data.get("index", 0)))
            merged = open_deltas.get(key)
            if merged is None:
                merged = open_deltas[key] = dict(data)
                out.append((request_id, kind, merged))
                continue
            merged["text"] = str(merged.get("text", "")) + str(data.get("text", ""))
            if data.get("logprobs"):
                merged["logprobs"] = [*(merged.get("logprobs") or []), *data["logprobs"]]
        return out

    def _heartbeats(self, now: float) -> None:
        quiet = [r for r, at in list(self._last.items()) if now - at >= self.heartbeat_s]
        if not quiet:
            return
        for request_id in quiet:
            if request_id in self._last:
                self._last[request_id] = now
        self._publish([(request_id, HEARTBEAT, {}) for request_id in quiet])

    def _poll_cancels(self) -> None:
        with self._watch_lock:
            watched = list(self._watched)
        found: Collection[str] = ()
        if watched:
            try:
                found = self.channel.cancelled(watched)
            except Exception:
                log.exception("inference.cancel_check_failed")
                return
        if found or self.cancelled:
            cancelled = frozenset(found)
            if cancelled != self.cancelled:
                self.cancelled = cancelled
                if self.on_cancelled is not None:
                    self.on_cancelled(cancelled)
