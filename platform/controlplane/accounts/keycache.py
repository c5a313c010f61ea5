"""An in-process cache of resolved API keys, invalidated at once on every access change.

Looking a key up costs a database round trip and four model rows on every
request; measured, that alone took authenticated requests to 0.6x the rate of
unauthenticated ones (bench/README.md). So each web process keeps the keys it
has resolved, by public prefix, for at most API_KEY_CACHE_SECONDS, and drops
them the moment anything that decides access changes:

- a save or delete of an APIKey, Membership, Organization or User (Django
  signals, so the admin, services and shells are all covered) drops that
  organization's entries in this process at once and again after commit, and
  publishes the organization id on Redis to every other process;
- each process listens on that channel in a daemon thread. While the listener is
  not connected the cache is bypassed (every request goes to the database), so a
  lost connection can make requests slower, never stale.

Writes that skip signals (`QuerySet.update()`) are not seen until the TTL ends;
the code uses them only for `last_used_at`. Expiry is checked on every request
from the cached row, so an expired key stops working on time.

The TTL counts from the database read, not from the last store: an entry carries
the time its row was read, and storing a refreshed copy (our own `last_used_at`
write) keeps that time. So whatever is missed (a failed publish, a write that
skips signals) is served for at most API_KEY_CACHE_SECONDS after the read, even for
a key in constant use.
"""

from __future__ import annotations

import os
import pickle
import threading
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, NamedTuple

import redis
import structlog
from django.conf import settings
from django.db import transaction

from controlplane.core.redis_clients import listening_client, sync_client
from controlplane.core.ttlcache import Token, TTLCache

if TYPE_CHECKING:
    from .models import APIKey

log = structlog.get_logger(__name__)

CHANNEL = "atelier:auth:invalidate"
#: Published instead of organization ids when a change concerns every organization.
EVERYONE = "*"


class Hit(NamedTuple):
    """A fresh copy of a cached key, and the token to store a changed copy back with."""

    api_key: APIKey
    token: Token


class _Entry(NamedTuple):
    read_at: float  # when the row was read from the database: the TTL counts from here
    organization_id: str
    blob: bytes  # the pickled key
    shared: APIKey  # a read-only copy of it


class KeyCache:
    def __init__(self) -> None:
        #: prefix → the cached key; a token() taken before the database read keeps a
        #: lookup that raced with an invalidation out, and bounds the entry by its read.
        self._entries: TTLCache[str, _Entry] = TTLCache(lambda: settings.API_KEY_CACHE_SECONDS)
        self._lock = threading.Lock()
        self._listener: threading.Thread | None = None
        self._listening = threading.Event()
        self._pid = os.getpid()
        #: Other per-organization caches dropped with the keys (None: everything).
        self.listeners: list[Callable[[set[str] | None], None]] = []

    # --- reads --------------------------------------------------------------------------

    @property
    def enabled(self) -> bool:
        if settings.API_KEY_CACHE_SECONDS <= 0:
            return False
        self._ensure_listener()
        return self._listening.is_set()

    def get(self, prefix: str) -> Hit | None:
        """A copy of the cached key, if it was read from the database less than
        API_KEY_CACHE_SECONDS ago; to store a changed copy, put() it with `hit.token`."""
        if not self.enabled:
            return None
        token = self._entries.token()  # before the look-up: a drop after it voids the hit
        entry = self._entries.get(prefix)
        if entry is None:
            return None
        # A fresh copy per request: views may change the objects they are handed.
        api_key: APIKey = pickle.loads(entry.blob)  # noqa: S301 - bytes this process pickled
        return Hit(api_key, token._replace(read_at=entry.read_at))

    def peek(self, prefix: str) -> APIKey | None:
        """`get` without the copy, for callers that only read the key (the asyncio
        inference path): shared by every such request, never to be changed."""
        if not self.enabled:
            return None
        entry = self._entries.get(prefix)
        return None if entry is None else entry.shared

    def token(self) -> Token:
        """Take before reading the database; hand to put() with what was read."""
        return self._entries.token()

    def put(self, api_key: APIKey, token: Token) -> None:
        """Store `api_key` as read at `token.read_at`: from the database (a token from
        token()), or a cached copy changed here (the token of its Hit), which so keeps
        its original read time and never lives past it plus the TTL."""
        if not self.enabled:
            return
        blob = pickle.dumps(api_key)
        shared: APIKey = pickle.loads(blob)  # noqa: S301 - just pickled here
        entry = _Entry(token.read_at, api_key.organization_id, blob, shared)
        self._entries.put(api_key.prefix, entry, token)

    # --- invalidation -------------------------------------------------------------------

    def drop(self, organization_ids: Iterable[str]) -> None:
        ids = set(organization_ids)
        if EVERYONE in ids:
            self.clear()
            return
        self._entries.drop_where(lambda _, entry: entry.organization_id in ids)
        for listener in self.listeners:
            listener(ids)

    def clear(self) -> None:
        self._entries.clear()
        for listener in self.listeners:
            listener(None)

    def invalidate(self, organization_ids: Iterable[str]) -> None:
        """Forget the organizations' keys here now, and everywhere once the change commits."""
        ids = sorted({i for i in organization_ids if i})
        if not ids:
            return
        self.drop(ids)

        def after_commit() -> None:
            self.drop(ids)
            self._publish(ids)

        transaction.on_commit(after_commit)

    def invalidate_all(self) -> None:
        """A change that concerns every organization (a base model): forget everything."""
        self.invalidate([EVERYONE])

    def _publish(self, ids: list[str]) -> None:
        try:
            sync_client().publish(CHANNEL, ",".join(ids))
        except redis.RedisError as exc:
            # Other processes then keep stale entries until their TTL: say so loudly.
            log.error("auth.invalidation_publish_failed", error=str(exc), organizations=ids)

    # --- the listener -------------------------------------------------------------------

    def _ensure_listener(self) -> None:
        if self._pid != os.getpid():  # forked: the parent's listener does not exist here
            listeners = self.listeners
            self.__init__()  # type: ignore[misc]
            self.listeners = listeners
        if self._listener is not None and self._listener.is_alive():
            return
        with self._lock:
            if self._listener is not None and self._listener.is_alive():
                return
            self._listener = threading.Thread(
                target=self._listen, name="auth-invalidation", daemon=True
            )
            self._listener.start()

    def _listen(self) -> None:
        backoff = 0.5
        while True:
            try:
                pubsub = listening_client().pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
                pubsub.subscribe(CHANNEL)
                # Anything published before we subscribed is unknown: start empty.
                self.clear()
                self._listening.set()
                backoff = 0.5
                while True:
                    message = pubsub.get_message(timeout=1.0)
                    if message and message["type"] == "message":
                        self.drop(_decode(message["data"]).split(","))
            except Exception as exc:  # any failure: bypass the cache until resubscribed
                self._listening.clear()
                self.clear()
                log.warning("auth.invalidation_listener_down", error=str(exc))
                time.sleep(backoff)
                backoff = min(backoff * 2, 10.0)


def _decode(data: Any) -> str:
    return data.decode() if isinstance(data, bytes) else str(data)


key_cache = KeyCache()
