"""Where an inference worker's replies and usage reports go, and where it reads cancellations.

Replies are published on the Redis (`REDIS_URL`) pub/sub channel
`reply_channel(request_id, reply_to)` (the gateway process's channel, or the
request's own), a request's usage report is an entry on the stream
`USAGE_STREAM`, and a cancellation is the Redis key `cancel_key(request_id)`.
See `jobcontracts.inference`.

The scheduler never waits on the network: it hands replies to an `Outbox`,
whose thread publishes everything that is waiting in one pipelined round trip
and polls the cancel keys of the requests it watches (one MGET) every few ms.
A stream's deltas after its first may be merged over a few ms
(`stream_interval_s`): one message per a few tokens instead of one per token.
A request's end (`finish`) travels the same queue behind its last reply: it
carries the usage report, and forgets the request's route.

When Redis fails (down, failing over), the two kinds of message part ways. A
usage report bills the customer and is never dropped: it goes to a durable
`UsageSpool` on disk and is replayed, in order, once Redis answers again (also
by the next outbox, if this worker dies first). Replies are only worth anything
while their client still waits: a batch that still fails after a short retry is
dropped, and while Redis keeps failing (retried with capped exponential backoff
and jitter) new replies are dropped at once, so nothing piles up in memory and
the engine, which only ever enqueues, never waits.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import random
import sqlite3
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Collection, Mapping
from typing import Any, Protocol, TypedDict

import orjson

from gpuworkers.usage_spool import UsageSpool
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
    retry_base_s: float
    retry_max_s: float


#: Streams open at which a stream's merge interval starts to grow (see `Outbox`).
STREAMS_PER_INTERVAL = 8
#: Tries of one batch while Redis answered the last time (a dropped connection
#: reconnects on the second); while it keeps failing, one try per backoff.
PUBLISH_ATTEMPTS = 2
#: Spooled usage reports replayed per round trip.
REPLAY_BATCH = 500


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
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        self.url = url
        # The outbox owns retrying (see `Outbox._publish`): one immediate reconnect here,
        # never redis-py's default of seconds of backoff inside one call, and short
        # timeouts, so an unreachable server is noticed in about a second.
        self.client: Any = redis.Redis.from_url(
            url,
            socket_keepalive=True,
            socket_connect_timeout=1.0,
            socket_timeout=2.0,
            retry=Retry(NoBackoff(), 1),
        )
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
    if not url:
        raise RuntimeError(
            "An inference worker needs Redis: set REDIS_URL (e.g. redis://HOST:6379/0). "
            "`make run` starts a private Redis and sets it."
        )
    return RedisChannel(url)


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
        spool: UsageSpool | None = None,
        retry_base_s: float = 0.1,
        retry_max_s: float = 2.0,
    ) -> None:
        self.channel = channel
        #: Where usage reports wait while the channel fails; None: they are logged and lost.
        self.spool = spool
        #: While the channel fails, it is retried after this, doubling up to `retry_max_s`.
        self.retry_base_s = retry_base_s
        self.retry_max_s = max(retry_base_s, retry_max_s)
        #: Consecutive failed tries (0: the channel answered the last one).
        self._failures = 0
        #: While failing, nothing is tried before this (monotonic); replies are dropped.
        self._retry_at = 0.0
        #: Reports wait in the spool: later ones are spooled behind them (kept in order).
        self._spooled = False
        self._dropped = 0
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
        # A worker restarted while Redis was down finds the reports its predecessor spooled.
        self._spooled = self._spool_size() > 0
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
            if self._spooled:  # wake for the next replay
                timeout = min(timeout, max(0.0, self._retry_at - now))
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
            if self._spooled and now >= self._retry_at:
                self._replay()
                now = time.monotonic()
            if now - last_check >= self.cancel_check_s and now >= self._retry_at:
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
        """Publish a batch; if the channel fails, spool its usage and drop its replies."""
        if self._spooled:  # behind the reports already waiting, never ahead of them
            batch = self._spool_usage(batch)
        if time.monotonic() < self._retry_at:
            self._shed(batch)
            return
        attempts = 1 if self._failures else PUBLISH_ATTEMPTS
        for attempt in range(attempts):
            try:
                self.channel.publish(batch)
            except Exception as exc:  # a dropped connection: redis-py reconnects on the next call
                if attempt + 1 < attempts:
                    time.sleep(0.05)
                    continue
                self._failed(exc)
                self._shed(batch)
                return
            self._answered()
            return

    def _answered(self) -> None:
        if self._failures:
            log.warning("inference.redis_recovered", extra={"dropped_replies": self._dropped})
        self._failures = 0
        self._retry_at = 0.0
        self._dropped = 0

    def _failed(self, exc: Exception) -> None:
        """The channel failed: try again after a capped, jittered exponential backoff."""
        self._failures += 1
        if self._failures == 1:
            log.warning("inference.redis_unavailable", extra={"error": repr(exc)})
        delay = min(self.retry_max_s, self.retry_base_s * 2 ** min(self._failures - 1, 30))
        # Jitter: workers that lost the same Redis do not all come back in step.
        self._retry_at = time.monotonic() + random.uniform(delay / 2, delay)  # noqa: S311

    @staticmethod
    def _usage_of(batch: list[Message]) -> list[dict[str, Any]]:
        return [data["usage"] for _, kind, data in batch if kind == END and data.get("usage")]

    def _spool_usage(self, batch: list[Message]) -> list[Message]:
        """The batch without its usage reports, which are now in the spool (if it took them)."""
        reports = self._usage_of(batch)
        if not reports or not self._spool_write(reports):
            return batch
        return [(r, END, {"usage": None}) if kind == END else (r, kind, d) for r, kind, d in batch]

    def _shed(self, batch: list[Message]) -> None:
        """The channel is failing: usage to the spool, replies dropped (their clients time
        out), the ended requests' routes forgotten."""
        reports = self._usage_of(batch)
        if reports and not self._spool_write(reports):
            log.error("inference.usage_lost", extra={"reports": reports})
        for request_id, kind, _ in batch:
            if kind == END:
                self.channel.routes.pop(request_id, None)
            else:
                self._dropped += 1

    def _spool_write(self, reports: list[dict[str, Any]]) -> bool:
        if self.spool is None:
            return False
        try:
            self.spool.append([orjson.dumps(report) for report in reports])
        except sqlite3.Error:
            log.exception("inference.usage_spool_failed")
            return False
        self._spooled = True
        return True

    def _spool_size(self) -> int:
        if self.spool is None:
            return 0
        try:
            return len(self.spool)
        except sqlite3.Error:
            log.exception("inference.usage_spool_failed")
            return 0

    def _replay(self) -> None:
        """Send the oldest spooled reports; delete them once the channel took them."""
        assert self.spool is not None
        try:
            rows = self.spool.head(REPLAY_BATCH)
        except sqlite3.Error:
            log.exception("inference.usage_spool_failed")
            self._retry_at = time.monotonic() + self.retry_max_s
            return
        if not rows:
            self._spooled = False
            return
        messages: list[Message] = []
        for _, raw in rows:
            try:
                report = orjson.loads(raw)
            except orjson.JSONDecodeError:
                report = None
            if not isinstance(report, dict):  # never written by us: not worth a stuck spool
                log.error("inference.usage_spool_unreadable", extra={"report": raw[:200]})
                continue
            messages.append((str(report.get("request_id", "")), END, {"usage": report}))
        try:
            self.channel.publish(messages)
        except Exception as exc:
            self._failed(exc)
            return
        self._answered()
        try:
            self.spool.remove([row_id for row_id, _ in rows])
        except sqlite3.Error:  # replayed again later: the control plane stores each request once
            log.exception("inference.usage_spool_failed")
        log.info("inference.usage_replayed", extra={"reports": len(rows)})

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
            except Exception as exc:
                self._failed(exc)  # no polling (or log line) every few ms while Redis is down
                return
        if found or self.cancelled:
            cancelled = frozenset(found)
            if cancelled != self.cancelled:
                self.cancelled = cancelled
                if self.on_cancelled is not None:
                    self.on_cancelled(cancelled)
