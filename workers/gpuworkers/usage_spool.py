"""Usage reports an inference worker could not hand to Redis, kept on disk until it can.

A usage report is what bills the customer: when the outbox cannot XADD it to the
usage stream (Redis is down, failing over, unreachable), the report goes here,
and the outbox replays the spool, oldest first, once Redis answers again. A row is
deleted only after Redis accepted it, so a worker that dies, or is restarted,
while Redis is down loses nothing: the next outbox on the same spool replays it
at start.

SQLite (stdlib) rather than a JSON-lines file: a commit is durable (WAL with
`synchronous=FULL` fsyncs it) and atomic, so a crash never leaves half a record;
deleting the replayed head is one statement, not a rewrite of the file; and
several processes on one spool (a worker and the child that replaced its outbox
process) are serialized by SQLite's own locking.

A replay is at-least-once: if Redis applied an XADD but the reply was lost, the
report is sent again. The control plane's usage-stream consumer stores each
`request_id` once (`controlplane.inference.usage`), which makes that harmless.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Mapping
from pathlib import Path

from jobcontracts.broker import data_dir

#: The spool's folder; default `{ATELIER_DATA_DIR}/spool/usage`.
SPOOL_DIR_ENV = "INFERENCE_USAGE_SPOOL_DIR"


def spool_dir_from_env(environ: Mapping[str, str] | None = None) -> Path:
    env = os.environ if environ is None else environ
    raw = env.get(SPOOL_DIR_ENV, "").strip()
    return Path(raw) if raw else data_dir(env) / "spool" / "usage"


class UsageSpool:
    """A durable FIFO of usage reports (their JSON, as XADDed), in `folder/usage.sqlite3`.

    Thread-safe; other processes may share the file."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / "usage.sqlite3"
        self._lock = threading.Lock()
        # Autocommit: each `_write` below is one explicit transaction.
        self._db = sqlite3.connect(
            self.path, timeout=10.0, isolation_level=None, check_same_thread=False
        )
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        # AUTOINCREMENT: ids never come back after a delete, so id order is append order.
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS usage ("
            "id INTEGER PRIMARY KEY AUTOINCREMENT, report BLOB NOT NULL)"
        )

    def append(self, reports: list[bytes]) -> None:
        """Store these reports durably (fsynced) before returning."""
        if reports:
            self._write("INSERT INTO usage (report) VALUES (?)", [(r,) for r in reports])

    def head(self, limit: int) -> list[tuple[int, bytes]]:
        """The oldest `limit` reports, with their row ids, in order."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id, report FROM usage ORDER BY id LIMIT ?", (limit,)
            ).fetchall()
        return [(int(row_id), bytes(report)) for row_id, report in rows]

    def remove(self, row_ids: list[int]) -> None:
        """Forget reports that Redis accepted."""
        if row_ids:
            self._write("DELETE FROM usage WHERE id = ?", [(i,) for i in row_ids])

    def __len__(self) -> int:
        with self._lock:
            (count,) = self._db.execute("SELECT count(*) FROM usage").fetchone()
        return int(count)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _write(self, statement: str, rows: list[tuple[object]]) -> None:
        """One transaction, committed (and fsynced) before returning."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany(statement, rows)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
