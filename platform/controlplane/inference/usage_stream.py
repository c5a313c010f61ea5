"""The control plane's reader of the usage stream (`jobcontracts.inference.USAGE_STREAM`).

Inference workers XADD one entry per request that ran. Every control worker runs
one `UsageStreamConsumer` thread in the consumer group `USAGE_GROUP`: it reads
entries in batches (XREADGROUP), stores them in one transaction
(`usage.usage_record_many`), and only after the commit acknowledges and deletes
them (XACK + XDEL). A consumer killed between the commit and the acknowledgement
leaves its entries pending; any consumer claims entries pending longer than
`claim_idle_ms` (XAUTOCLAIM) and stores them again, which stores nothing twice:
the request id is unique. So each report is stored exactly once.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from typing import Any

import orjson
import redis
import structlog
from django.conf import settings
from django.db import close_old_connections

from jobcontracts.inference import USAGE_GROUP, USAGE_STREAM

from . import usage

log = structlog.get_logger(__name__)

Entry = tuple[bytes, dict[bytes, bytes]]


def ensure_group(client: redis.Redis) -> None:
    try:
        # From the stream's first entry: reports written before any consumer existed count.
        client.xgroup_create(USAGE_STREAM, USAGE_GROUP, id="0", mkstream=True)
    except redis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


def _payload(fields: dict[bytes, bytes]) -> dict[str, Any]:
    try:
        value = orjson.loads(fields.get(b"report", b""))
    except orjson.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def store(client: redis.Redis, entries: list[Entry]) -> dict[str, int]:
    """Store a batch, then acknowledge it (never before the commit)."""
    if not entries:
        return {}
    counts = usage.usage_record_many([_payload(fields) for _, fields in entries])
    ids = [entry_id for entry_id, _ in entries]
    pipe = client.pipeline(transaction=False)
    pipe.xack(USAGE_STREAM, USAGE_GROUP, *ids)
    pipe.xdel(USAGE_STREAM, *ids)
    pipe.execute()
    return counts


class UsageStreamConsumer:
    def __init__(
        self,
        *,
        url: str | None = None,
        name: str | None = None,
        batch: int = 500,
        block_ms: int = 1000,
        claim_idle_ms: int = 30_000,
        linger_s: float = 0.25,
    ) -> None:
        self.client: redis.Redis = redis.Redis.from_url(url or settings.REDIS_URL)
        self.name = name or f"{socket.gethostname()}-{os.getpid()}"
        self.batch = batch
        self.block_ms = block_ms
        self.claim_idle_ms = claim_idle_ms
        #: After a short batch, wait this long for more: one transaction per many reports
        #: under load (measured: per-report commits cost the control worker ~1.5 ms CPU a
        #: request at 32 concurrent callers), at most this much later in the ledger.
        self.linger_s = linger_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_claim = 0.0

    def drain(self, *, block_ms: int | None = None) -> int:
        """One pass: claim stale entries of dead consumers, then read new ones. Returns
        how many entries were stored and acknowledged."""
        ensure_group(self.client)
        done = 0
        if time.monotonic() - self._last_claim >= self.claim_idle_ms / 2000:
            self._last_claim = time.monotonic()
            answer: Any = self.client.xautoclaim(
                USAGE_STREAM, USAGE_GROUP, self.name, self.claim_idle_ms, "0-0", count=self.batch
            )
            entries = [(i, f) for i, f in answer[1] if f]  # deleted entries come back empty
            store(self.client, entries)
            done += len(entries)
        read: Any = self.client.xreadgroup(
            USAGE_GROUP,
            self.name,
            {USAGE_STREAM: ">"},
            count=self.batch,
            block=self.block_ms if block_ms is None else block_ms,
        )
        for _stream, fresh in read or []:
            store(self.client, fresh)
            done += len(fresh)
        return done

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="usage-stream", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 3.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        backoff = 0.5
        while not self._stop.is_set():
            try:
                close_old_connections()
                stored = self.drain()
                backoff = 0.5
                if 0 < stored < self.batch:
                    self._stop.wait(self.linger_s)
            except Exception as exc:  # Redis or the database blinked: the entries wait
                log.error("inference.usage_stream_failed", error=str(exc))
                time.sleep(backoff)
                backoff = min(backoff * 2, 10.0)
