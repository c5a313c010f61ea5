"""The limits' Redis connections: one blocking client per process, one asyncio client per loop.

A `redis.asyncio` connection belongs to the event loop that opened it, so each
loop gets its own client (and its own registered scripts); the blocking client is
re-created after a fork. Scripts are registered once per client with
`register_script`, which runs them with EVALSHA and loads them again only when
Redis answers NOSCRIPT (after a restart or SCRIPT FLUSH).
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
_sync: tuple[int, redis.Redis] | None = None
_sync_scripts: dict[str, Any] = {}
_async: weakref.WeakKeyDictionary[
    asyncio.AbstractEventLoop, tuple[redis.asyncio.Redis, dict[str, Any]]
] = weakref.WeakKeyDictionary()


def _url() -> str:
    url: str = settings.REDIS_URL  # required by the settings
    return url


def sync_client() -> redis.Redis:
    global _sync
    pid = os.getpid()
    current = _sync
    if current is not None and current[0] == pid:
        return current[1]
    with _lock:
        if _sync is None or _sync[0] != pid:
            timeout = settings.LIMITS_REDIS_TIMEOUT_SECONDS
            client = redis.Redis.from_url(
                _url(), socket_timeout=timeout, socket_connect_timeout=timeout
            )
            _sync = (pid, client)
            _sync_scripts.clear()
        return _sync[1]


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
        timeout = settings.LIMITS_REDIS_TIMEOUT_SECONDS
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


def key(*parts: str) -> str:
    return ":".join((settings.LIMITS_KEY_PREFIX, *parts))
