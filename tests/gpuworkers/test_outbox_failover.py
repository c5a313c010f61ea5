"""Usage reports survive a Redis outage: a private `redis-server` (its own port, AOF on
so the stream outlives a restart) is killed by its pid for over 30 s while the real
outboxes keep being handed requests, then started again on the same port. Every usage
report reaches the stream exactly once; replies are dropped meanwhile, never held, and
no call on the engine's side waits for Redis. A worker killed while Redis is down
leaves its reports in the spool, and the next outbox replays them."""

from __future__ import annotations

import collections
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis

from gpuworkers.outbox_process import ProcessOutbox
from gpuworkers.replies import Outbox, RedisChannel
from gpuworkers.usage_spool import UsageSpool
from jobcontracts.inference import USAGE_STREAM, process_channel
from tests.gpuworkers.test_outbox_process import REPO, Listener, usage

pytestmark = pytest.mark.slow

#: How long Redis is down: a failover of at least 30 s.
OUTAGE_S = 31.0


class PrivateRedis:
    """A `redis-server` of this test's own, stopped and started again by its pid."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = int(s.getsockname()[1])
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                "redis-server",
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--save", "",
                "--appendonly", "yes",
                "--appendfsync", "always",
                "--dir", str(self.folder),
                "--logfile", str(self.folder / "redis.log"),
            ],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        client = redis.Redis(port=self.port)
        deadline = time.monotonic() + 10
        try:
            while True:
                try:
                    if client.ping():
                        return
                except redis.RedisError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
        finally:
            client.close()

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(10)

    def stream_ids(self) -> collections.Counter[str]:
        """How many times each request id is on the usage stream."""
        client = redis.Redis(port=self.port)
        try:
            entries = client.xrange(USAGE_STREAM)
        finally:
            client.close()
        return collections.Counter(
            _report_id(fields[b"report"]) for _, fields in entries if b"report" in fields
        )


def _report_id(raw: bytes) -> str:
    return str(json.loads(raw)["request_id"])


def _serve(outbox: Outbox | ProcessOutbox, web: str) -> tuple[str, float]:
    """What the engine hands the outbox for one request; how long its calls took."""
    rid = f"req-{uuid.uuid4().hex[:10]}"
    began = time.monotonic()
    outbox.route(rid, web)
    outbox.watch(rid)
    outbox.send(rid, "start", {"queue_ms": 0.5})
    for _ in range(20):
        outbox.send(rid, "delta", {"index": 0, "text": "tok "})
    outbox.send(rid, "done", {"choices": [{"index": 0, "text": rid}]})
    outbox.unwatch(rid)
    outbox.finish(rid, usage(rid))
    return rid, time.monotonic() - began


def _wait(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def test_usage_published_during_a_30s_redis_outage_reaches_the_stream_once_it_is_back(
    tmp_path: Path,
) -> None:
    server = PrivateRedis(tmp_path / "redis")
    server.start()
    thread_spool = UsageSpool(tmp_path / "spool-thread")
    outboxes: dict[str, Outbox | ProcessOutbox] = {}
    try:
        thread_outbox = Outbox(RedisChannel(server.url), spool=thread_spool, cancel_check_s=0.02)
        thread_outbox.start()
        outboxes["thread"] = thread_outbox
        outboxes["process"] = ProcessOutbox(
            server.url, {"cancel_check_s": 0.02}, spool_dir=tmp_path / "spool-process"
        )
        web = process_channel(uuid.uuid4().hex)
        sent: list[str] = []
        for outbox in outboxes.values():
            sent += [_serve(outbox, web)[0] for _ in range(3)]
        _wait(lambda: set(server.stream_ids()) >= set(sent), 10, "usage before the outage")

        server.kill()
        down_since = time.monotonic()
        slowest = 0.0
        while time.monotonic() - down_since < OUTAGE_S:
            for outbox in outboxes.values():
                rid, took = _serve(outbox, web)
                sent.append(rid)
                slowest = max(slowest, took)
            time.sleep(1.5)
        # A flood of replies while Redis is down is dropped, not held in memory.
        streaming = f"req-{uuid.uuid4().hex[:10]}"
        thread_outbox.send(streaming, "start", {})
        for _ in range(5000):
            thread_outbox.send(streaming, "delta", {"index": 0, "text": "x"})
        _wait(lambda: thread_outbox._queue.qsize() == 0, 5, "the outbox to shed its replies")
        assert len(thread_spool) > 0, "usage of the outage is not in the spool"

        server.start()
        listener = Listener(redis.Redis(port=server.port), web)
        try:
            # Replies flow again once the outbox's backoff lets it try.
            def answered() -> bool:
                for outbox in outboxes.values():
                    sent.append(_serve(outbox, web)[0])
                try:
                    listener.until(1, timeout=0.5)
                except AssertionError:
                    return False
                return True

            _wait(answered, 15, "replies after the outage")
        finally:
            listener.close()
        _wait(lambda: set(server.stream_ids()) >= set(sent), 15, "the spooled usage")
        time.sleep(0.5)
        counts = server.stream_ids()
        assert sorted(counts) == sorted(sent)
        assert [rid for rid, n in counts.items() if n != 1] == []
        assert slowest < 0.5, f"an engine-side call waited {slowest:.2f}s for Redis"
        _wait(lambda: len(thread_spool) == 0, 5, "the thread outbox's spool to empty")
        process_spool = UsageSpool(tmp_path / "spool-process")
        _wait(lambda: len(process_spool) == 0, 5, "the process outbox's spool to empty")
    finally:
        for outbox in outboxes.values():
            outbox.close()
        server.kill()


def test_a_worker_killed_while_redis_is_down_leaves_its_usage_for_the_next_outbox(
    tmp_path: Path,
) -> None:
    server = PrivateRedis(tmp_path / "redis")  # not started: Redis is down from the start
    spool_dir = tmp_path / "spool"
    ids = [f"req-{uuid.uuid4().hex[:10]}" for _ in range(5)]
    script = textwrap.dedent(
        f"""
        import sys, time
        from pathlib import Path
        sys.path[:0] = [{os.path.join(REPO, "workers")!r}, {REPO!r}]
        from gpuworkers.outbox_process import ProcessOutbox
        from tests.gpuworkers.test_outbox_process import usage
        outbox = ProcessOutbox({server.url!r}, {{}}, spool_dir=Path({str(spool_dir)!r}))
        print(outbox.pid, flush=True)
        for rid in {ids!r}:
            outbox.send(rid, "start", {{}})
            outbox.send(rid, "done", {{"choices": []}})
            outbox.finish(rid, usage(rid))
        time.sleep(600)
        """
    )
    worker = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, cwd=REPO, env=os.environ
    )
    outbox: ProcessOutbox | None = None
    try:
        assert worker.stdout is not None
        child = int(worker.stdout.readline())
        spool = UsageSpool(spool_dir)
        _wait(lambda: len(spool) == len(ids), 15, "the worker to spool its usage")
        # The whole worker dies at once: nothing is left to flush anything.
        os.kill(child, signal.SIGKILL)
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait(10)
        assert len(spool) == len(ids)

        # Its replacement starts while Redis is still down, then Redis comes back.
        outbox = ProcessOutbox(server.url, {}, spool_dir=spool_dir)
        time.sleep(1.0)
        server.start()
        _wait(lambda: set(server.stream_ids()) >= set(ids), 15, "the replayed usage")
        _wait(lambda: len(spool) == 0, 5, "the spool to empty")
        assert server.stream_ids() == collections.Counter(ids)
    finally:
        if outbox is not None:
            outbox.close()
        if worker.poll() is None:
            worker.kill()
        server.kill()
