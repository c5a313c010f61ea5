"""The outbox: replies in order, a stream's later deltas merged, cancel keys read for
watched requests, heartbeats for silent ones; the Redis channel."""

from __future__ import annotations

import json
import os
import time
import uuid

import pytest
import redis

from gpuworkers.replies import MemoryChannel, Outbox, RedisChannel
from jobcontracts.inference import cancel_key, reply_channel


def test_later_deltas_are_merged_in_order_and_everything_else_goes_at_once() -> None:
    channel = MemoryChannel()
    outbox = Outbox(channel, stream_interval_s=0.2)
    outbox.start()
    try:
        outbox.send("r1", "start", {"queue_ms": 1.0})
        outbox.send("r1", "delta", {"index": 0, "text": "a", "logprobs": [{"token": "a"}]})
        deadline = time.monotonic() + 5
        while len(channel.replies["r1"]) < 2 and time.monotonic() < deadline:
            time.sleep(0.005)
        first_two = [r.type for r in channel.replies["r1"]]  # the first delta is not held
        for text in ("b", "c", "d"):
            outbox.send("r1", "delta", {"index": 0, "text": text, "logprobs": [{"token": text}]})
        outbox.send("r1", "delta", {"index": 1, "text": "x"})
        outbox.send("r1", "done", {"choices": []})
        channel.wait_final("r1", timeout=5)
    finally:
        outbox.close()
    assert first_two == ["start", "delta"]
    replies = channel.replies["r1"]
    assert [r.type for r in replies] == ["start", "delta", "delta", "delta", "done"]
    assert replies[2].data == {
        "index": 0,
        "text": "bcd",
        "logprobs": [{"token": "b"}, {"token": "c"}, {"token": "d"}],
    }
    assert replies[3].data == {"index": 1, "text": "x"}


def test_another_request_s_urgent_reply_does_not_flush_a_stream_s_held_deltas() -> None:
    channel = MemoryChannel()
    outbox = Outbox(channel, stream_interval_s=0.3)
    outbox.start()

    def wait_for(request_id: str, count: int) -> None:
        deadline = time.monotonic() + 5
        while len(channel.replies[request_id]) < count and time.monotonic() < deadline:
            time.sleep(0.002)

    try:
        outbox.send("a", "delta", {"index": 0, "text": "1"})  # a's first delta: at once
        wait_for("a", 1)
        outbox.send("a", "delta", {"index": 0, "text": "2"})  # held for a's interval
        outbox.send("b", "start", {})
        outbox.send("b", "done", {"choices": []})
        channel.wait_final("b", timeout=5)
        # b's replies went at once; a's later delta is still waiting to be merged.
        held = [r.data["text"] for r in channel.replies["a"]]
        outbox.send("a", "delta", {"index": 0, "text": "3"})
        outbox.send("a", "done", {"choices": []})
        channel.wait_final("a", timeout=5)
    finally:
        outbox.close()
    assert held == ["1"]
    replies = channel.replies["a"]
    assert [(r.type, r.data.get("text")) for r in replies] == [
        ("delta", "1"),
        ("delta", "23"),
        ("done", None),
    ]


def test_the_merge_interval_grows_with_the_streams_open() -> None:
    outbox = Outbox(MemoryChannel(), stream_interval_s=0.02, stream_interval_max_s=0.08)
    assert outbox._interval() == 0.02
    outbox._streaming.update(f"r{i}" for i in range(16))
    assert outbox._interval() == pytest.approx(0.04)
    outbox._streaming.update(f"s{i}" for i in range(64))
    assert outbox._interval() == pytest.approx(0.08)  # capped


def test_cancel_keys_are_read_for_watched_requests_only() -> None:
    channel = MemoryChannel()
    outbox = Outbox(channel, cancel_check_s=0.001)
    outbox.start()
    try:
        outbox.watch("a")
        channel.cancel("a")
        channel.cancel("b")  # not watched: never read
        deadline = time.monotonic() + 5
        while "a" not in outbox.cancelled and time.monotonic() < deadline:
            time.sleep(0.002)
        assert outbox.cancelled == frozenset({"a"})
        outbox.unwatch("a")
        deadline = time.monotonic() + 5
        while outbox.cancelled and time.monotonic() < deadline:
            time.sleep(0.002)
        assert outbox.cancelled == frozenset()
    finally:
        outbox.close()


def test_redis_channel_publishes_on_the_reply_channel_and_reads_cancel_keys() -> None:
    url = os.environ["REDIS_URL"]
    client = redis.Redis.from_url(url)
    request_id = f"test-{uuid.uuid4().hex[:8]}"
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(reply_channel(request_id))
    time.sleep(0.05)
    channel = RedisChannel(url)
    try:
        channel.publish([(request_id, "start", {}), (request_id, "done", {"choices": []})])
        got = []
        deadline = time.monotonic() + 5
        while len(got) < 2 and time.monotonic() < deadline:
            message = pubsub.get_message(timeout=0.5)
            if message:
                got.append(json.loads(message["data"]))
        assert [m["type"] for m in got] == ["start", "done"]
        assert got[0]["request_id"] == request_id
        assert channel.cancelled([request_id]) == set()
        client.set(cancel_key(request_id), "1", ex=60)
        assert channel.cancelled([request_id, "other"]) == {request_id}
    finally:
        client.delete(cancel_key(request_id))
        pubsub.close()
        channel.close()
