"""The worker's reply I/O in a child process: replies in order and batched per gateway
process, usage after them, cancellations back to the engine's side, and no reply lost
when the worker's process dies or the child is killed (real Redis, real processes)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from gpuworkers.outbox_process import ProcessOutbox
from gpuworkers.replies import RedisChannel
from jobcontracts.inference import (
    USAGE_STREAM,
    Reply,
    UsageReport,
    cancel_key,
    process_channel,
    reply_channel,
)
from tests.support.usage import usage_report

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def client() -> Iterator[Any]:
    c = redis.Redis.from_url(os.environ["REDIS_URL"])
    yield c
    c.close()


class Listener:
    """A gateway process's subscription: every message, and the replies in them."""

    def __init__(self, client: Any, channel: str) -> None:
        self.pubsub = client.pubsub(ignore_subscribe_messages=True)
        self.pubsub.subscribe(channel)
        time.sleep(0.05)
        self.messages: list[Any] = []
        self.replies: list[Reply] = []

    def until(self, done: int, timeout: float = 10) -> list[Reply]:
        """Read until `done` final (done/error) replies have arrived."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if sum(r.type in ("done", "error") for r in self.replies) >= done:
                return self.replies
            message = self.pubsub.get_message(timeout=0.2)
            if message:
                data = json.loads(message["data"])
                self.messages.append(data)
                self.replies += Reply.batch_from_json(data)
        raise AssertionError(f"only {self.replies}")

    def close(self) -> None:
        self.pubsub.close()


def usage(request_id: str) -> UsageReport:
    return usage_report(request_id=request_id, kind="completion", prompt_tokens=3)


def stream_reports(client: Any, ids: set[str]) -> list[str]:
    found = []
    for _, fields in client.xrange(USAGE_STREAM):
        report = json.loads(fields[b"report"])
        if report["request_id"] in ids:
            found.append(report["request_id"])
    return found


def test_replies_for_one_gateway_process_go_as_one_message_in_order(client: Any) -> None:
    web = process_channel(uuid.uuid4().hex)
    listener = Listener(client, web)
    outbox = ProcessOutbox(os.environ["REDIS_URL"], {})
    ids = [f"req-{uuid.uuid4().hex[:8]}" for _ in range(3)]
    try:
        for rid in ids:
            outbox.route(rid, web)
        # Everything handed over together: the child publishes it together.
        outbox.send_many(
            [(rid, "start", {"queue_ms": 0.5}) for rid in ids]
            + [(rid, "done", {"choices": [{"index": 0, "text": rid}]}) for rid in ids]
        )
        for rid in ids:
            outbox.finish(rid, usage(rid))
        replies = listener.until(3)
    finally:
        outbox.close()
        listener.close()
    for rid in ids:
        mine = [r for r in replies if r.request_id == rid]
        assert [r.type for r in mine] == ["start", "done"]
        assert mine[1].data["choices"][0]["text"] == rid
    # Fewer messages than replies: batched per gateway process.
    assert len(listener.messages) < len(replies)
    assert any(isinstance(m, list) for m in listener.messages)
    assert sorted(stream_reports(client, set(ids))) == sorted(ids)


def test_a_request_without_a_gateway_channel_gets_single_replies_on_its_own(
    client: Any,
) -> None:
    rid = f"req-{uuid.uuid4().hex[:8]}"
    listener = Listener(client, reply_channel(rid))
    channel = RedisChannel(os.environ["REDIS_URL"])
    try:
        channel.publish([(rid, "start", {}), (rid, "done", {"choices": []})])
        listener.until(1)
    finally:
        channel.close()
        listener.close()
    assert all(isinstance(m, dict) for m in listener.messages)


def test_a_cancel_key_reaches_the_engine_side_and_clears_when_unwatched(client: Any) -> None:
    outbox = ProcessOutbox(os.environ["REDIS_URL"], {"cancel_check_s": 0.005})
    rid = f"req-{uuid.uuid4().hex[:8]}"
    try:
        outbox.watch(rid)
        outbox.watch("other")
        client.set(cancel_key(rid), "1", ex=60)
        deadline = time.monotonic() + 10
        while rid not in outbox.cancelled and time.monotonic() < deadline:
            time.sleep(0.01)
        assert outbox.cancelled == frozenset({rid})
        outbox.unwatch(rid)
        deadline = time.monotonic() + 10
        while outbox.cancelled and time.monotonic() < deadline:
            time.sleep(0.01)
        assert outbox.cancelled == frozenset()
    finally:
        client.delete(cancel_key(rid))
        outbox.close()


def _gone(pid: int, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        # A zombie still answers kill(0): read its state.
        try:
            with open(f"/proc/{pid}/stat") as stat:
                if stat.read().split(")")[-1].split()[0] == "Z":
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.05)
    return False


def test_replies_handed_over_before_the_worker_dies_are_still_published(client: Any) -> None:
    """The engine's process is SIGKILLed right after handing replies over: the child
    publishes them (and the usage), then exits on end-of-file."""
    web = process_channel(uuid.uuid4().hex)
    listener = Listener(client, web)
    rid = f"req-{uuid.uuid4().hex[:8]}"
    script = textwrap.dedent(
        f"""
        import os, signal, sys, time
        sys.path[:0] = [{os.path.join(REPO, "workers")!r}, {REPO!r}]
        from gpuworkers.outbox_process import ProcessOutbox
        from tests.gpuworkers.test_outbox_process import usage
        outbox = ProcessOutbox({os.environ["REDIS_URL"]!r}, {{}})
        print(outbox.pid, flush=True)
        outbox.route({rid!r}, {web!r})
        outbox.send({rid!r}, "start", {{}})
        outbox.send({rid!r}, "done", {{"choices": []}})
        outbox.finish({rid!r}, usage({rid!r}))
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    worker = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, cwd=REPO, env=os.environ
    )
    try:
        assert worker.stdout is not None
        child = int(worker.stdout.readline())
        assert worker.wait(30) == -signal.SIGKILL
        replies = listener.until(1)
        assert [r.type for r in replies] == ["start", "done"]
        assert _gone(child), "the outbox process outlived its worker"
        deadline = time.monotonic() + 5
        while not stream_reports(client, {rid}) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert stream_reports(client, {rid}) == [rid]
    finally:
        listener.close()
        if worker.poll() is None:
            worker.kill()


def test_a_killed_outbox_process_is_replaced_on_the_next_reply(client: Any) -> None:
    web = process_channel(uuid.uuid4().hex)
    listener = Listener(client, web)
    outbox = ProcessOutbox(os.environ["REDIS_URL"], {})
    try:
        first = outbox.pid
        assert first is not None
        os.kill(first, signal.SIGKILL)
        assert _gone(first)
        rid = f"req-{uuid.uuid4().hex[:8]}"
        outbox.route(rid, web)  # finds the pipe broken: a new child takes over
        outbox.send(rid, "done", {"choices": []})
        assert [r.type for r in listener.until(1)] == ["done"]
        assert outbox.pid not in (None, first)
    finally:
        outbox.close()
        listener.close()
