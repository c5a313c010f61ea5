"""Every Redis client of the control plane is built here.

- `sync_client()`: the process's blocking client, with timeouts; made again after a fork
  (a connection must not be shared by two processes). `blocks_for=` gives a caller that
  blocks in Redis on purpose (the usage stream's XREADGROUP BLOCK) its own client, whose
  reads wait that much longer.
- `async_client()`: this event loop's asyncio client, with timeouts, and the scripts
  registered on it: a `redis.asyncio` connection belongs to the loop that opened it.
- `async_listener()`: this event loop's asyncio client for pub/sub, whose reads wait as
  long as the reader asks (a connect timeout only).
- `listening_client()`: a new blocking client for a thread that waits on pub/sub.

The per-loop clients are kept in weak maps keyed by the loop: they go with their loop,
and a new loop that happens to reuse a dead one's id never gets its clients. Scripts are
registered once per client with `register_script` (EVALSHA; loaded again only when
Redis answers NOSCRIPT, after a restart or SCRIPT FLUSH). The timeout is
LIMITS_REDIS_TIMEOUT_SECONDS: a request must not hang on a Redis that stopped answering.
"""

from __future__ import annotations

import asyncio
import os
import threading
import weakref
from typing import Any

import redis
import redis.asyncio
from django.conf import settings

_lock = threading.Lock()
#: blocks_for → (the pid that made it, the client).
_sync: dict[float, tuple[int, redis.Redis]] = {}
_sync_scripts: dict[str, Any] = {}
_async: weakref.WeakKeyDictionary[
    asyncio.AbstractEventLoop, tuple[redis.asyncio.Redis, dict[str, Any]]
] = weakref.WeakKeyDictionary()
_listeners: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, redis.asyncio.Redis] = (
    weakref.WeakKeyDictionary()
)


def _url() -> str:
    url: str = settings.REDIS_URL  # required by the settings
    return url


def _timeout() -> float:
    return float(settings.LIMITS_REDIS_TIMEOUT_SECONDS)


def sync_client(*, blocks_for: float = 0.0) -> redis.Redis:
    """The process's blocking client. `blocks_for`: how long the caller's commands wait
    inside Redis on purpose (XREADGROUP BLOCK), which their reads may take on top of the
    timeout; one client per value."""
    pid = os.getpid()
    current = _sync.get(blocks_for)
    if current is not None and current[0] == pid:
        return current[1]
    with _lock:
        current = _sync.get(blocks_for)
        if current is None or current[0] != pid:
            timeout = _timeout()
            client = redis.Redis.from_url(
                _url(), socket_timeout=timeout + blocks_for, socket_connect_timeout=timeout
            )
            current = _sync[blocks_for] = (pid, client)
            if not blocks_for:
                _sync_scripts.clear()  # registered on the client this one replaces
        return current[1]


def sync_script(name: str, source: str) -> Any:
    """`source` registered on the process's blocking client (callable: keys=, args=)."""
    client = sync_client()
    script = _sync_scripts.get(name)
    if script is None:
        script = _sync_scripts[name] = client.register_script(source)
    return script


def async_client() -> tuple[redis.asyncio.Redis, dict[str, Any]]:
    loop = asyncio.get_running_loop()
    entry = _async.get(loop)
    if entry is None:
        timeout = _timeout()
        client = redis.asyncio.Redis.from_url(
            _url(), socket_timeout=timeout, socket_connect_timeout=timeout
        )
        entry = _async[loop] = (client, {})
    return entry


def async_script(name: str, source: str) -> Any:
    """`source` registered on this event loop's asyncio client (awaitable call)."""
    client, scripts = async_client()
    script = scripts.get(name)
    if script is None:
        script = scripts[name] = client.register_script(source)
    return script


def async_listener() -> redis.asyncio.Redis:
    """This event loop's client for pub/sub reads (`get_message(timeout=…)` sets the wait)."""
    loop = asyncio.get_running_loop()
    client = _listeners.get(loop)
    if client is None:
        client = _listeners[loop] = redis.asyncio.Redis.from_url(
            _url(), socket_connect_timeout=_timeout()
        )
    return client


def listening_client() -> redis.Redis:
    """A new blocking client for one listening thread: reads time out (and the thread
    resubscribes) rather than wait forever on a dead connection."""
    return redis.Redis.from_url(
        _url(), socket_timeout=5, socket_connect_timeout=_timeout(), health_check_interval=10
    )
