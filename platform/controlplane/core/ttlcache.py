"""The in-process cache with expiring entries that the per-request look-ups share.

Plans, rate limits, budgets, billing standing, prices, API keys and model references
are read on every inference request and change rarely: each process keeps what it read
for a few seconds. A hit costs a dict look-up and a clock read, no lock; writes take one.
The TTL is read at each `put`, so a changed setting applies to the next entry. Changes
made in this process `pop`, `drop_where` or `clear` the entries they make wrong.

A look-up that may race with an invalidation takes a `token()` before it reads and
hands it to `put`: what was read is then not kept if anything was dropped since, and
its TTL counts from the read, not from the store.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable
from typing import Generic, NamedTuple, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class Token(NamedTuple):
    """Taken before a read: the drops seen so far, and the (monotonic) time of the read."""

    generation: int
    read_at: float


class TTLCache(Generic[K, V]):
    """`ttl()` seconds per entry; past `maxsize` entries it starts again empty (a bound,
    not an eviction policy: every entry is cheap to read again)."""

    def __init__(self, ttl: Callable[[], float], *, maxsize: int = 10_000) -> None:
        self._ttl = ttl
        self._maxsize = maxsize
        self._entries: dict[K, tuple[float, V]] = {}
        self._lock = threading.Lock()
        #: Bumped on every drop: a read that raced with one is not stored (see `put`).
        self._generation = 0

    def get(self, key: K) -> V | None:
        """The live entry, or None."""
        hit = self._entries.get(key)
        if hit is not None and hit[0] > time.monotonic():
            return hit[1]
        return None

    def token(self) -> Token:
        return Token(self._generation, time.monotonic())

    def put(self, key: K, value: V, token: Token | None = None) -> V:
        """Keep `value` for `ttl()` seconds from now, or from `token.read_at`; with a
        token, not at all if something was dropped since it was taken."""
        now = time.monotonic()
        expires = (now if token is None else token.read_at) + self._ttl()
        with self._lock:
            if expires <= now or (token is not None and token.generation != self._generation):
                return value
            if len(self._entries) >= self._maxsize:
                self._entries.clear()
            self._entries[key] = (expires, value)
        return value

    def pop(self, key: K) -> None:
        with self._lock:
            self._generation += 1
            self._entries.pop(key, None)

    def drop_where(self, where: Callable[[K, V], bool]) -> None:
        """Drop the entries `where(key, value)` holds for."""
        with self._lock:
            self._generation += 1
            for key in [k for k, (_, v) in self._entries.items() if where(k, v)]:
                del self._entries[key]

    def clear(self) -> None:
        with self._lock:
            self._generation += 1
            self._entries.clear()
