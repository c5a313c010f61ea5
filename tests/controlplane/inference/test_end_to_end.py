"""Inference through real processes: the ASGI server, an inference worker, a control worker.

The official `openai` SDK talks HTTP to `atelier web`; the request goes over Redis
to `atelier worker inference`, replies come back on Redis pub/sub, and usage
reaches PostgreSQL through the control worker.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest

from controlplane.accounts.models import APIKey
from controlplane.inference.models import UsageRecord
from controlplane.modelregistry.models import BaseModel
from tests.support.jobs import purge_broker
from tests.support.models import minilm_dir, tiny_model_dir
from tests.support.people import Person
from tests.support.processes import Server, asgi_server, worker

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

ENV = {
    "INFERENCE_SILENCE_SECONDS": "3",
    "INFERENCE_HEARTBEAT_SECONDS": "1",
    "TORCH_NUM_THREADS": "1",
    "OMP_NUM_THREADS": "1",
}
LLAMA = "atelier-tiny-llama"
MINILM = "all-MiniLM-L6-v2"


@pytest.fixture
def stack(alice: Person, tmp_path: Path) -> Iterator[tuple[Server, Any]]:
    purge_broker()
    BaseModel.objects.create(
        id=LLAMA,
        family="llama",
        tasks=["causal_lm", "classification"],
        methods=["supervised"],
        adapters=["lora", "full"],
        context_length=256,
        uri=tiny_model_dir("llama").as_uri(),
        price_per_1k_training_tokens=Decimal("0.0008"),
    )
    BaseModel.objects.create(
        id=MINILM,
        family="bert",
        tasks=["embeddings", "classification"],
        methods=["supervised"],
        adapters=["lora", "full"],
        context_length=256,
        uri=minilm_dir().as_uri(),
        price_per_1k_training_tokens=Decimal("0.0001"),
    )
    with (
        worker("control", tmp_path / "control", **ENV),
        worker("inference", tmp_path / "inference", **ENV) as inference,
        asgi_server(tmp_path / "web", **ENV) as server,
    ):
        yield server, inference


def sdk(server: Server, person: Person) -> openai.OpenAI:
    return openai.OpenAI(api_key=person.key, base_url=server.url + "/v1", max_retries=0, timeout=60)


def usage_rows(person: Person, expected: int, timeout: float = 30) -> list[UsageRecord]:
    deadline = time.monotonic() + timeout
    rows: list[UsageRecord] = []
    while time.monotonic() < deadline:
        rows = list(
            UsageRecord.objects.for_organization(person.organization).order_by("created_at")
        )
        if len(rows) >= expected:
            return rows
        time.sleep(0.2)
    raise AssertionError(f"{len(rows)} usage records, expected {expected}")


def warm(client: openai.OpenAI) -> None:
    """The first request loads the model (a cold model may take a while)."""
    client.with_options(timeout=120).chat.completions.create(
        model=LLAMA, messages=[{"role": "user", "content": "hello"}], max_tokens=2
    )


def test_the_sdk_chats_streams_completes_and_embeds_and_each_request_is_metered_once(
    stack: tuple[Server, Any], alice: Person
) -> None:
    server, _ = stack
    client = sdk(server, alice)
    warm(client)
    messages = [{"role": "user", "content": "where is my order"}]

    raw = client.chat.completions.with_raw_response.create(
        model=LLAMA, messages=messages, max_tokens=12, temperature=0
    )
    assert raw.headers["x-request-id"]
    assert int(raw.headers["openai-processing-ms"]) >= 0
    reply = raw.parse()
    assert reply.object == "chat.completion"
    assert reply.choices[0].message.role == "assistant"
    assert reply.usage is not None
    assert reply.usage.completion_tokens <= 12
    assert reply.usage.prompt_tokens > 3

    chunks = list(
        client.chat.completions.create(
            model=LLAMA,
            messages=messages,
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == reply.choices[0].message.content  # greedy: streaming changes nothing
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == reply.usage.completion_tokens

    completion = client.completions.create(model=LLAMA, prompt=["the cat", "one two"], max_tokens=5)
    assert len(completion.choices) == 2

    floats = client.embeddings.create(model=MINILM, input=["hello world", "invoice"])
    assert len(floats.data) == 2
    assert len(floats.data[0].embedding) == 384
    packed = httpx.post(
        server.url + "/v1/embeddings",
        headers={"Authorization": f"Bearer {alice.key}"},
        json={"model": MINILM, "input": ["hello world"], "encoding_format": "base64"},
        timeout=60,
    ).json()
    decoded = np.frombuffer(base64.b64decode(packed["data"][0]["embedding"]), dtype="<f4")
    assert np.allclose(decoded, floats.data[0].embedding, atol=1e-6)
    short = client.embeddings.create(model=MINILM, input="hello world", dimensions=64)
    assert len(short.data[0].embedding) == 64
    assert abs(float(np.linalg.norm(short.data[0].embedding)) - 1.0) < 1e-4

    rows = usage_rows(alice, 7)  # warm-up, chat, stream, completion, 3 embeddings
    assert len({r.request_id for r in rows}) == len(rows) == 7
    chat_rows = [r for r in rows if r.kind == "chat"]
    assert [r.completion_tokens for r in chat_rows[1:]] == [reply.usage.completion_tokens] * 2
    (key_id,) = APIKey.objects.for_organization(alice.organization).values_list("pk", flat=True)
    assert {r.api_key_id for r in rows} == {key_id}


def test_a_client_that_hangs_up_mid_stream_stops_the_generation_and_pays_for_what_it_got(
    stack: tuple[Server, Any], alice: Person
) -> None:
    server, _ = stack
    warm(sdk(server, alice))
    body = {
        "model": LLAMA,
        "messages": [{"role": "user", "content": "tell me everything"}],
        # Greedy: this prompt never reaches the end token within the context (24 prompt
        # tokens + 220), so only the hang-up can end it early.
        "max_tokens": 220,
        "temperature": 0,
        "stream": True,
    }
    with httpx.stream(
        "POST",
        server.url + "/v1/chat/completions",
        headers={"Authorization": f"Bearer {alice.key}"},
        json=body,
        timeout=60,
    ) as response:
        assert response.status_code == 200
        seen = 0
        for line in response.iter_lines():
            if line.startswith("data: {"):
                seen += 1
            if seen >= 3:
                break  # the client goes away

    rows = usage_rows(alice, 2)
    cancelled = rows[-1]
    assert cancelled.status == "cancelled"
    assert 1 <= cancelled.completion_tokens < 220


def test_a_worker_killed_mid_request_gives_the_caller_a_clean_error(
    stack: tuple[Server, Any], alice: Person
) -> None:
    server, inference = stack
    warm(sdk(server, alice))
    body = {
        "model": LLAMA,
        "messages": [{"role": "user", "content": "tell me everything"}],
        "max_tokens": 220,
        "temperature": 0,
        "stream": True,
    }
    started = time.monotonic()
    events: list[dict[str, Any]] = []
    with httpx.stream(
        "POST",
        server.url + "/v1/chat/completions",
        headers={"Authorization": f"Bearer {alice.key}"},
        json=body,
        timeout=60,
    ) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                events.append(json.loads(line[6:]))
                if len(events) == 2:
                    os.kill(inference.pid, signal.SIGKILL)  # the whole threads-pool worker
            if line == "data: [DONE]":
                break
    assert events[-1]["error"]["code"] == "worker_lost"
    assert time.monotonic() - started < 30
