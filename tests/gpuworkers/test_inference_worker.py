"""A real `atelier worker inference` process: requests pushed on the Redis request list
(or sent by task name), replies on Redis pub/sub, cancel through the cancel key, and
each request's usage report read as the control plane receives it, off the usage
stream."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery

from jobcontracts import queues
from jobcontracts.broker import celery_config
from jobcontracts.inference import (
    USAGE_STREAM,
    InferenceRequest,
    Reply,
    UsageReport,
    cancel_key,
    process_channel,
    reply_channel,
    request_queue,
)
from tests.gpuworkers.inference_support import model_ref, request, varied_model_dir
from tests.support.processes import stop

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


@contextmanager
def inference_worker(log: Path, **env: str) -> Iterator[subprocess.Popen[bytes]]:
    full = {k: v for k, v in os.environ.items() if k != "DJANGO_SETTINGS_MODULE"}
    full.update(
        PYTHONPATH=str(ROOT / "workers"),
        PYTHONUNBUFFERED="1",
        INFERENCE_CONCURRENCY="8",
        TORCH_NUM_THREADS="1",
        **env,
    )
    with log.open("wb") as out:
        process = subprocess.Popen(
            [str(BIN / "atelier"), "worker", "inference"],
            env=full,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
    try:
        deadline = time.monotonic() + 120
        while "inference.ready" not in log.read_text(errors="replace"):
            assert process.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        yield process
    finally:
        stop(process)


def client_app(environ: dict[str, str]) -> Celery:
    app = Celery("inference-test-client", fixups=[])
    app.conf.update(celery_config(environ))
    return app


def stream_usage(client: Any, request_id: str, timeout: float = 30) -> list[UsageReport]:
    """Every usage report for this request on the usage stream (waits for the first)."""
    deadline = time.monotonic() + timeout
    while True:
        found = [
            UsageReport.from_json(json.loads(fields[b"report"]))
            for _, fields in client.xrange(USAGE_STREAM)
        ]
        mine = [r for r in found if r.request_id == request_id]
        if mine or time.monotonic() > deadline:
            return mine
        time.sleep(0.1)


def push(client: Any, req: InferenceRequest | bytes) -> None:
    """What the gateway does: LPUSH on the request list."""
    raw = req if isinstance(req, bytes) else json.dumps(req.to_json()).encode()
    client.lpush(request_queue(queues.GPU_INFERENCE), raw)


class Subscription:
    def __init__(self, client: Any, req: InferenceRequest) -> None:
        self.pubsub = client.pubsub()
        self.pubsub.subscribe(reply_channel(req.request_id, req.reply_to))
        # The gateway subscribes before sending: wait for Redis to confirm it.
        assert self.pubsub.get_message(timeout=5)["type"] == "subscribe"

    def replies(self, timeout: float = 60, on_delta: Any = None) -> list[Reply]:
        found: list[Reply] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            message = self.pubsub.get_message(timeout=1)
            if not message or message["type"] != "message":
                continue
            for reply in Reply.batch_from_json(json.loads(message["data"])):
                found.append(reply)
                if reply.type == "delta" and on_delta is not None:
                    on_delta(found)
                if reply.type in ("done", "error"):
                    self.pubsub.close()
                    return found
        raise AssertionError(f"no final reply: {found}")


@pytest.fixture(scope="module")
def redis_worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    url = os.environ["REDIS_URL"]
    log = tmp_path_factory.mktemp("inference") / "worker.log"
    with inference_worker(log, REDIS_URL=url):
        yield url


def test_worker_takes_requests_off_the_redis_list_and_replies_to_the_callers_channel(
    redis_worker: str,
) -> None:
    client = redis.Redis.from_url(redis_worker)
    req = request(model_ref(varied_model_dir()), max_tokens=12, stream=True)
    req = dataclasses.replace(req, reply_to=process_channel("test-web-process"))
    subscription = Subscription(client, req)

    push(client, req)
    replies = subscription.replies()

    kinds = [r.type for r in replies]
    assert kinds[0] == "start"
    assert kinds[-1] == "done", replies[-1]
    assert "delta" in kinds
    done = replies[-1].data
    text = "".join(r.data["text"] for r in replies if r.type == "delta")
    assert text == done["choices"][0]["text"]
    assert done["usage"]["completion_tokens"] == 12
    [usage] = stream_usage(client, req.request_id)
    assert (usage.status, usage.completion_tokens) == ("completed", 12)
    assert usage.prompt_tokens == done["usage"]["prompt_tokens"]
    time.sleep(1)
    assert len(stream_usage(client, req.request_id)) == 1  # exactly one


def test_a_malformed_request_on_the_list_gets_an_error_reply_and_the_worker_goes_on(
    redis_worker: str,
) -> None:
    client = redis.Redis.from_url(redis_worker)
    bad = {"request_id": "req-malformed", "kind": "chat", "model": {"id": "x"}}
    subscription = Subscription(
        client,
        dataclasses.replace(request(model_ref(varied_model_dir())), request_id=bad["request_id"]),
    )
    push(client, b"not json at all")
    push(client, json.dumps(bad).encode())
    [error] = subscription.replies(timeout=30)
    assert (error.type, error.data["status"], error.data["code"]) == (
        "error",
        400,
        "invalid_request",
    )

    req = request(model_ref(varied_model_dir()), max_tokens=3)
    subscription = Subscription(client, req)
    push(client, req)
    assert subscription.replies()[-1].type == "done"
    assert stream_usage(client, "req-malformed", timeout=0.5) == []


def test_the_cancel_key_stops_a_stream_on_the_worker_sent_by_task_name(redis_worker: str) -> None:
    app = client_app({"REDIS_URL": redis_worker})
    client = redis.Redis.from_url(redis_worker)
    req = request(model_ref(varied_model_dir()), prompt="one", max_tokens=240, stream=True)
    subscription = Subscription(client, req)

    def cancel_after_two(found: list[Reply]) -> None:
        if sum(r.type == "delta" for r in found) == 2:
            client.set(cancel_key(req.request_id), "1", ex=60)

    app.send_task(queues.INFER, args=[req.to_json()], queue=queues.GPU_INFERENCE)
    replies = subscription.replies(on_delta=cancel_after_two)

    done = replies[-1]
    assert done.type == "done"
    assert done.data["choices"][0]["finish_reason"] == "cancelled"
    produced = done.data["usage"]["completion_tokens"]
    assert 2 <= produced < 240
    [usage] = stream_usage(client, req.request_id)
    assert (usage.status, usage.completion_tokens) == ("cancelled", produced)
