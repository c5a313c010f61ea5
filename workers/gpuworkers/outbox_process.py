"""The inference worker's reply I/O in a process of its own, off the engine's GIL.

An `Outbox` thread in the engine's process publishes replies, polls cancel keys
and sends heartbeats: all of it Python (redis-py builds and parses every
command), and all of it takes the GIL from the decode loop. On a small model
at 32 concurrent requests that thread used a third as much CPU as the engine
itself, and the engine waited for it. `ProcessOutbox` keeps the `Outbox`'s
interface but runs the `Outbox` (and its `RedisChannel`) in a child process: the
engine's side of each call is one pickled write on a pipe; the child sends the
set of cancelled requests back only when it changes, to a reader thread that
sleeps otherwise. (vLLM splits its engine core from its API/output process for
the same reason.)

Ordering is the pipe's: a request's route, replies and end reach the child in
the order they were sent, from every thread (one lock around the write). The
child exits when it reads `None` (`close`) or end-of-file: if the worker dies,
the child still publishes what it was handed, then stops. If the child dies,
the next write starts a new one; replies lost with it end their requests at the
gateway's silence deadline (a clean 503), as a dead worker's would.

The child's `Outbox` spools usage reports it cannot publish to `spool_dir`
(see `gpuworkers.usage_spool`): on disk, they outlive both processes.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import pickle
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from gpuworkers.replies import Message, Outbox, OutboxOptions, RedisChannel
from gpuworkers.usage_spool import UsageSpool, spool_dir_from_env
from jobcontracts.inference import UsageReport

log = logging.getLogger(__name__)

_SPAWN = multiprocessing.get_context("spawn")


class ProcessOutbox:
    """`Outbox`'s interface; the outbox itself runs in a child process."""

    def __init__(self, url: str, options: OutboxOptions, *, spool_dir: Path | None = None) -> None:
        """`options`: the timing of the child's `Outbox`; `spool_dir`: where it keeps the
        usage reports Redis did not take (default `spool_dir_from_env()`)."""
        self.url = url
        self.options = options
        self.spool_dir = spool_dir if spool_dir is not None else spool_dir_from_env()
        UsageSpool(self.spool_dir).close()  # an unusable spool fails here, at start-up
        #: Replaced (never mutated) by the reader thread: read without a lock.
        self.cancelled: frozenset[str] = frozenset()
        self._lock = threading.Lock()
        self._local = threading.local()
        self._process: Any = None
        self._out: Connection | None = None
        self._closed = False
        self._spawn()

    def _spawn(self) -> None:
        ops_read, ops_write = _SPAWN.Pipe(duplex=False)
        cancels_read, cancels_write = _SPAWN.Pipe(duplex=False)
        self._process = _SPAWN.Process(
            target=_serve,
            args=(self.url, self.options, self.spool_dir, ops_read, cancels_write),
            name="inference-outbox",
            daemon=True,
        )
        self._process.start()
        # The child holds its ends now: closing ours lets end-of-file reach each side.
        ops_read.close()
        cancels_write.close()
        self._out = ops_write
        threading.Thread(
            target=self._read_cancels, args=(cancels_read,), name="outbox-cancels", daemon=True
        ).start()

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def start(self) -> None:
        """The child is started by the constructor (an `Outbox` starts its thread here)."""

    # -- calls, forwarded in order --------------------------------------------------------

    @contextlib.contextmanager
    def batched(self) -> Iterator[None]:
        """This thread's calls inside are written to the child in one go, at the end.

        Each write to the pipe lets go of the GIL, and getting it back can wait up to
        the interpreter's switch interval (5 ms) behind another thread: the engine
        writes once per iteration, the intake once per burst of requests."""
        if getattr(self._local, "ops", None) is not None:  # nested: the outer one writes
            yield
            return
        self._local.ops = []
        try:
            yield
        finally:
            ops, self._local.ops = self._local.ops, None
            if ops:
                self._write(ops)

    def flush(self) -> None:
        """Write what this thread's `batched` block holds so far (it stays batched)."""
        ops = getattr(self._local, "ops", None)
        if ops:
            self._local.ops = []
            self._write(ops)

    def _call(self, *ops: tuple[str, tuple[Any, ...]]) -> None:
        buffered = getattr(self._local, "ops", None)
        if buffered is not None:
            buffered.extend(ops)
            return
        self._write(ops)

    def _write(self, ops: Sequence[tuple[str, tuple[Any, ...]]]) -> None:
        payload = pickle.dumps(tuple(ops), protocol=pickle.HIGHEST_PROTOCOL)
        with self._lock:
            if self._closed:
                return
            try:
                assert self._out is not None
                self._out.send_bytes(payload)
            except OSError:
                log.exception("inference.outbox_process_lost")
                self._respawn()
                assert self._out is not None
                self._out.send_bytes(payload)

    def _respawn(self) -> None:
        if self._out is not None:
            self._out.close()
        if self._process is not None:
            self._process.join(1)
        self._spawn()

    def send(self, request_id: str, kind: str, data: dict[str, Any]) -> None:
        self._call(("send", (request_id, kind, data)))

    def send_many(self, messages: list[Message]) -> None:
        if messages:
            self._call(*(("send", message) for message in messages))

    def route(self, request_id: str, reply_to: str | None) -> None:
        if reply_to:
            self._call(("route", (request_id, reply_to)))

    def finish(self, request_id: str, usage: UsageReport | None) -> None:
        self._call(("finish", (request_id, usage)))

    def watch(self, request_id: str) -> None:
        self._call(("watch", (request_id,)))

    def unwatch(self, request_id: str) -> None:
        self._call(("unwatch", (request_id,)))

    def close(self, timeout: float = 10.0) -> None:
        """Publish everything sent so far, then stop the child (it waits up to 5 s for
        its outbox: longer here, so usage is spooled before we give up on it)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._out is not None:
                with contextlib.suppress(OSError):
                    self._out.send_bytes(pickle.dumps(None))
                self._out.close()
        if self._process is not None:
            self._process.join(timeout)
            if self._process.is_alive():
                self._process.terminate()
                self._process.join(1)

    def _read_cancels(self, source: Connection) -> None:
        while True:
            try:
                # A private pipe to our own child: nothing untrusted is unpickled.
                self.cancelled = pickle.loads(source.recv_bytes())  # noqa: S301
            except (EOFError, OSError):
                source.close()
                return


def _serve(
    url: str, options: OutboxOptions, spool_dir: Path, ops: Connection, cancels: Connection
) -> None:
    """The child: an `Outbox` on a `RedisChannel`, fed by the engine process's pipe."""
    # Ctrl-C reaches the whole process group: the worker closes us when it stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=logging.WARNING)

    def report(cancelled: frozenset[str]) -> None:
        # If the engine's process is gone, we stop at end-of-file.
        with contextlib.suppress(OSError):
            cancels.send_bytes(pickle.dumps(cancelled, protocol=pickle.HIGHEST_PROTOCOL))

    outbox = Outbox(RedisChannel(url), on_cancelled=report, spool=UsageSpool(spool_dir), **options)
    outbox.start()
    calls: dict[str, Callable[..., None]] = {
        "send": outbox.send,
        "route": outbox.route,
        "finish": outbox.finish,
        "watch": outbox.watch,
        "unwatch": outbox.unwatch,
    }
    try:
        while True:
            try:
                batch = pickle.loads(ops.recv_bytes())  # noqa: S301 (our parent's pipe)
            except (EOFError, OSError):
                break
            if batch is None:
                break
            for name, args in batch:
                calls[name](*args)
    finally:
        outbox.close()
        cancels.close()
