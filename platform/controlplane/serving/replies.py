"""Replies from the inference workers (see jobcontracts.inference), on the event loop.

Each web process (event loop) holds one pub/sub subscription for all its requests,
the `ReplyHub`: requests name its channel as `reply_to`, and one reader task hands
each reply (or a worker's batch of them) to its request's inbox. No subscribe round
trip per request, one Redis connection for every reply, and a reply cannot be
missed: the channel is subscribed before the first request is sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
import weakref
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

import orjson

from controlplane.core.redis_clients import async_client, async_listener
from jobcontracts.inference import Reply, cancel_key, process_channel


class ReplyTimeout(Exception):
    """Nothing arrived in time: `started` says whether a worker had begun the request."""

    def __init__(self, started: bool) -> None:
        super().__init__("no reply in time")
        self.started = started


async def acancel(request_id: str) -> None:
    """Ask the worker to stop generating for this request (the caller went away)."""
    await async_client()[0].set(cancel_key(request_id), b"1", ex=600)


class ReplyHub:
    """One pub/sub subscription per web process (event loop) for all its requests.

    Should the connection drop, the reader resubscribes; requests whose replies were
    lost meanwhile end as their silence deadline says (a clean 503), never hang.
    """

    def __init__(self) -> None:
        self.channel = process_channel(uuid.uuid4().hex)
        self._queues: dict[str, _Inbox] = {}
        self._ready = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> ReplyHub:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._read())
        await self._ready.wait()
        return self

    def register(self, request_id: str) -> _Inbox:
        inbox = self._queues[request_id] = _Inbox()
        return inbox

    def unregister(self, request_id: str) -> None:
        self._queues.pop(request_id, None)

    async def _read(self) -> None:
        backoff = 0.05
        while True:
            pubsub = async_listener().pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.channel)
                self._ready.set()
                backoff = 0.05
                while True:
                    message = await pubsub.get_message(timeout=30.0)
                    if message is None or message["type"] != "message":
                        continue
                    # One reply, or a worker's batch of replies for this process.
                    for reply in Reply.batch_from_json(orjson.loads(message["data"])):
                        inbox = self._queues.get(reply.request_id)
                        if inbox is not None:
                            inbox.put(reply)
            except asyncio.CancelledError:
                raise
            except Exception:  # the connection dropped: subscribe again
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]


#: Per event loop, gone with it (uvicorn runs one loop per process).
_hubs: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, ReplyHub] = weakref.WeakKeyDictionary()


async def hub() -> ReplyHub:
    """This event loop's hub, started on first use."""
    loop = asyncio.get_running_loop()
    found = _hubs.get(loop)
    if found is None:
        found = _hubs[loop] = ReplyHub()
    return await found.start()


class _Inbox:
    """One request's replies as the hub delivers them, and the one reader waiting.

    A future per wait rather than an asyncio.Queue read through a task: a stream
    waits once per message, and a task per wait was a real share of the web
    process's CPU at 32 concurrent streams.
    """

    def __init__(self) -> None:
        self.items: deque[Reply] = deque()
        self.waiter: asyncio.Future[None] | None = None

    def put(self, reply: Reply) -> None:
        self.items.append(reply)
        _wake(self.waiter)


def _wake(future: asyncio.Future[Any] | None) -> None:
    if future is not None and not future.done():
        future.set_result(None)


class Subscription:
    """Replies to one request through its process's `ReplyHub`, read with deadlines:
    `total` for the whole request and `silence` once a worker has started it (a dead
    worker goes silent)."""

    _hub: ReplyHub
    _inbox: _Inbox

    def __init__(self, request_id: str, *, total: float, silence: float) -> None:
        self.request_id = request_id
        self.deadline = time.monotonic() + total
        self.silence = silence
        self.started = False
        self._last = time.monotonic()

    async def aopen(self) -> Subscription:
        self._hub = await hub()
        self._inbox = self._hub.register(self.request_id)
        return self

    async def aclose(self) -> None:
        hub = getattr(self, "_hub", None)  # None: it was never opened
        if hub is not None:
            hub.unregister(self.request_id)

    def _wait_limit(self) -> float:
        now = time.monotonic()
        limit = self.deadline - now
        if self.started:
            limit = min(limit, self._last + self.silence - now)
        if limit <= 0:
            raise ReplyTimeout(self.started)
        return limit

    def _seen(self, reply: Reply) -> Reply:
        self._last = time.monotonic()
        if reply.type != "error":
            self.started = True
        return reply

    async def areplies(self) -> AsyncIterator[Reply]:
        """Replies until `done` or `error` (inclusive); ReplyTimeout if they stop coming."""
        never: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        while True:
            reply = await self.next_or(never)
            assert reply is not None  # never interrupted
            yield reply
            if reply.type in ("done", "error"):
                return

    async def next_or(self, interrupted: asyncio.Future[Any]) -> Reply | None:
        """The next reply, or None as soon as `interrupted` is done (the client left).
        Raises ReplyTimeout past the deadlines."""
        loop = asyncio.get_running_loop()
        inbox = self._inbox
        while True:
            limit = self._wait_limit()
            if inbox.items:
                return self._seen(inbox.items.popleft())
            if interrupted.done():
                return None
            waiter: asyncio.Future[None] = loop.create_future()
            inbox.waiter = waiter

            def wake(_: Any, waiter: asyncio.Future[None] = waiter) -> None:
                _wake(waiter)

            timer = loop.call_later(min(limit, 1.0), _wake, waiter)
            interrupted.add_done_callback(wake)
            try:
                await waiter
            finally:
                timer.cancel()
                interrupted.remove_done_callback(wake)
                inbox.waiter = None
