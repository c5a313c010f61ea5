"""The control plane's reader of the usage stream (`jobcontracts.inference.USAGE_STREAM`).

Inference workers XADD one entry per request that ran. Every control worker runs
one `UsageStreamConsumer` thread in the consumer group `USAGE_GROUP`: it reads
entries in batches (XREADGROUP), stores them in one transaction
(`usage.usage_record_many`), and only after the commit acknowledges and deletes
them (XACK + XDEL). A consumer killed between the commit and the acknowledgement
leaves its entries pending; any consumer claims entries pending longer than
`claim_idle_ms` (XAUTOCLAIM) and stores them again, which stores nothing twice:
the request id is unique. So each report is stored exactly once.

A poison entry (not a usage report, `at` in milliseconds, token counts no column
holds, a row PostgreSQL refuses) must not hold back the good ones beside it, nor be
claimed forever: each entry is checked before the batch's transaction, and what is
refused is parked in `USAGE_DEAD_STREAM` (the original fields plus `reason`, `error`
and the original `entry_id`) and acknowledged in the same MULTI. An unavailable
database parks nothing: the batch stays pending and is retried. Operators list and
replay dead letters with `atelier manage usage_dead_letters` (deploy/README.md).
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
from django.db import close_old_connections
from prometheus_client import Counter

from controlplane.core.redis_clients import sync_client
from jobcontracts.inference import USAGE_GROUP, USAGE_STREAM, UsageReport

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


#: Where refused entries wait for an operator; trimmed (MAXLEN ~) to the newest ones.
USAGE_DEAD_STREAM = f"{USAGE_STREAM}:dead"
USAGE_DEAD_MAXLEN = 100_000

DEAD_LETTERS = Counter(
    "atelier_usage_dead_letter_total",
    "Usage-stream entries parked in the dead-letter stream, by why they were refused.",
    ["reason"],
)
for _reason in usage.REJECTION_REASONS:  # every series exists (at 0) from the start
    DEAD_LETTERS.labels(reason=_reason)


def _payload(fields: dict[bytes, bytes]) -> object:
    raw = fields.get(b"report")
    if raw is None:
        raise usage.UsageReportInvalid(usage.MALFORMED, "the entry has no `report` field")
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise usage.UsageReportInvalid(usage.MALFORMED, f"`report` is not JSON: {exc}") from None


def store(client: redis.Redis, entries: list[Entry]) -> dict[str, int]:
    """Store a batch, then acknowledge it (never before the commit). Entries that are
    refused (checked before the transaction, or by the database row by row) are parked
    in the dead-letter stream and acknowledged with the rest. A database that is down
    raises before anything is acknowledged or parked."""
    if not entries:
        return {}
    reports: list[UsageReport] = []
    by_request: dict[str, list[Entry]] = {}
    dead: list[tuple[Entry, str, str]] = []
    for entry in entries:
        try:
            report = usage.usage_report_parse(_payload(entry[1]))
        except usage.UsageReportInvalid as exc:
            dead.append((entry, exc.reason, str(exc)))
            continue
        reports.append(report)
        by_request.setdefault(report.request_id, []).append(entry)
    result = usage.usage_record_batch(reports)
    for request_id, error in result.refused.items():
        dead += [(entry, usage.DATABASE_REJECTED, error) for entry in by_request[request_id]]
    ids = [entry_id for entry_id, _ in entries]
    # One MULTI: an entry is parked exactly when it is acknowledged, never one without
    # the other (a consumer dying in between leaves both undone, to be claimed).
    pipe = client.pipeline(transaction=True)
    for (entry_id, fields), reason, error in dead:
        letter: dict[Any, Any] = {
            **fields,
            b"reason": reason,
            b"error": error[:1000],
            b"entry_id": entry_id,
        }
        pipe.xadd(USAGE_DEAD_STREAM, letter, maxlen=USAGE_DEAD_MAXLEN, approximate=True)
    pipe.xack(USAGE_STREAM, USAGE_GROUP, *ids)
    pipe.xdel(USAGE_STREAM, *ids)
    pipe.execute()
    for (entry_id, _), reason, error in dead:
        DEAD_LETTERS.labels(reason=reason).inc()
        log.warning(
            "inference.usage_dead_lettered",
            entry_id=entry_id.decode(),
            reason=reason,
            error=error,
            dead_letter_stream=USAGE_DEAD_STREAM,
        )
    return {**result.counts, "dead_lettered": len(dead)}


class UsageStreamConsumer:
    def __init__(
        self,
        *,
        name: str | None = None,
        batch: int = 500,
        block_ms: int = 1000,
        claim_idle_ms: int = 30_000,
        linger_s: float = 0.25,
    ) -> None:
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
        block = self.block_ms if block_ms is None else block_ms
        client = sync_client(blocks_for=block / 1000)  # its reads outwait the BLOCK
        ensure_group(client)
        done = 0
        if time.monotonic() - self._last_claim >= self.claim_idle_ms / 2000:
            self._last_claim = time.monotonic()
            answer: Any = client.xautoclaim(
                USAGE_STREAM, USAGE_GROUP, self.name, self.claim_idle_ms, "0-0", count=self.batch
            )
            entries = [(i, f) for i, f in answer[1] if f]  # deleted entries come back empty
            store(client, entries)
            done += len(entries)
        read: Any = client.xreadgroup(
            USAGE_GROUP,
            self.name,
            {USAGE_STREAM: ">"},
            count=self.batch,
            block=block,
        )
        for _stream, fresh in read or []:
            store(client, fresh)
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
