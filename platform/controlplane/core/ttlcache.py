"""The in-process cache with expiring entries that the per-request look-ups share.

Plans, rate limits, budgets, billing standing and prices are read on every inference
request and change rarely: each process keeps what it read for a few seconds. A hit
costs a dict look-up and a clock read, no lock; writes take one. The TTL is read at each
`put`, so a changed setting applies to the next entry. Changes made in this process
`pop` or `clear` the entries they make wrong (signals, on commit).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class TTLCache(Generic[K, V]):
    """`ttl()` seconds per entry; past `maxsize` entries it starts again empty (a bound,
    not an eviction policy: every entry is cheap to read again)."""

    def __init__(self, ttl: Callable[[], float], *, maxsize: int = 10_000) -> None:
        self._ttl = ttl
        self._maxsize = maxsize
        self._entries: dict[K, tuple[float, V]] = {}
        self._lock = threading.Lock()

    def get(self, key: K) -> V | None:
        """The live entry, or None."""
        hit = self._entries.get(key)
        if hit is not None and hit[0] > time.monotonic():
            return hit[1]
        return None

    def put(self, key: K, value: V) -> V:
        expires = time.monotonic() + self._ttl()
        with self._lock:
            if len(self._entries) >= self._maxsize:
                self._entries.clear()
            self._entries[key] = (expires, value)
        return value

    def pop(self, key: K) -> None:
        with self._lock:
            self._entries.pop(key, None)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
