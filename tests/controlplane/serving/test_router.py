"""The serving router under a real `atelier web`: bad requests get OpenAI's errors with
the status, code and param the DRF endpoints would give (a 401 names the realm); a
full worker queue is refused at once; a cached model lookup is forgotten the moment
its deployment goes; a non-streamed generation whose caller hung up is stopped.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from django.conf import settings

from controlplane.inference.models import UsageRecord
from jobcontracts import queues
from jobcontracts.inference import request_queue
from tests.support.people import Person
from tests.support.processes import Server, asgi_server, worker
from tests.support.registry import base_model, customer_model

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

CHAT = "/v1/chat/completions"
ENV = {"INFERENCE_SILENCE_SECONDS": "3", "TORCH_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}


def chat(**extra: Any) -> dict[str, Any]:
    return {"model": "test-base", "messages": [{"role": "user", "content": "hi"}], **extra}


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    base_model("test-base", tasks=["causal_lm"], context_length=256)
    base_model("test-embedder", family="bert", tasks=["embeddings"], context_length=512)
    with asgi_server(tmp_path / "web", **ENV) as running:
        yield running


def _key(person: Person, scopes: list[str]) -> str:
    created = person.client.post(
        "/v1/organization/api_keys", {"name": "app", "scopes": scopes}, format="json"
    )
    assert created.status_code == 201, created.content
    return str(created.json()["value"])


def _answer(response: Any) -> tuple[int, str | None, str | None]:
    error = response.json().get("error") or {}
    return response.status_code, error.get("code"), error.get("param")


def test_bad_requests_get_openai_errors_naming_what_to_change(
    server: Server, alice: Person, charlie: Person
) -> None:
    foreign = customer_model(charlie, suffix="theirs").pk
    files_key = _key(alice, ["files.read"])
    Case = tuple[str, dict[str, str], bytes | None, dict[str, Any] | None, str, tuple[Any, ...]]
    cases: list[Case] = [
        # (path, headers, raw body or None, json body or None, what, (status, code, param))
        (CHAT, {}, None, chat(), "no key", (401, "missing_api_key", None)),
        (
            CHAT,
            {"Authorization": "Bearer atl_live_nope"},
            None,
            chat(),
            "malformed key",
            (401, "invalid_api_key", None),
        ),
        (
            CHAT,
            {"Authorization": "Basic abc"},
            None,
            chat(),
            "wrong scheme",
            (401, "invalid_api_key", None),
        ),
        (
            CHAT,
            {"Authorization": f"Bearer {files_key}"},
            None,
            chat(),
            "no inference scope",
            (403, "missing_scope", None),
        ),
        (
            CHAT,
            {"Content-Type": "text/plain"},
            b"hello",
            None,
            "not JSON",
            (415, "unsupported_media_type", None),
        ),
        (
            CHAT,
            {"Content-Type": "application/json"},
            b"{not json",
            None,
            "malformed JSON",
            (400, "invalid_json", None),
        ),
        (CHAT, {}, None, chat(messages=[]), "empty messages", (400, "invalid_value", "messages")),
        (
            CHAT,
            {},
            None,
            chat(messages=[{"role": "wizard", "content": "x"}]),
            "role",
            (400, "invalid_value", "messages"),
        ),
        (
            CHAT,
            {},
            None,
            chat(messages=[{"role": "user", "content": 42}]),
            "content",
            (400, "invalid_value", "messages"),
        ),
        (
            CHAT,
            {},
            None,
            chat(max_tokens=100_000),
            "max_tokens",
            (400, "invalid_value", "max_tokens"),
        ),
        (CHAT, {}, None, chat(n=99), "n", (400, "invalid_value", "n")),
        (
            CHAT,
            {},
            None,
            chat(model="no-such-model"),
            "unknown model",
            (404, "model_not_found", "model"),
        ),
        (CHAT, {}, None, chat(model=foreign), "foreign model", (404, "model_not_found", "model")),
        (
            CHAT,
            {},
            None,
            chat(model="test-embedder"),
            "wrong task",
            (400, "model_not_supported", "model"),
        ),
        (
            "/v1/embeddings",
            {},
            None,
            {"model": "test-embedder", "input": "x", "encoding_format": "hex"},
            "format",
            (400, "invalid_value", "encoding_format"),
        ),
        (
            CHAT,
            {"x-atelier-timeout": "soon"},
            None,
            chat(),
            "bad timeout header",
            (400, "invalid_header", None),
        ),
    ]
    answers, expected = {}, {}
    for path, headers, raw, body, what, answer in cases:
        sent = {"Authorization": f"Bearer {alice.key}", **headers}
        if what == "no key":
            sent.pop("Authorization")
        response = httpx.post(
            server.url + path,
            headers=sent,
            content=raw if raw is not None else None,
            json=body if raw is None else None,
            timeout=10,
        )
        answers[what], expected[what] = _answer(response), answer
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}, what
        assert response.headers["x-request-id"], what
        if response.status_code == 401:
            assert response.headers["www-authenticate"] == 'Bearer realm="atelier"', what
    assert answers == expected


def test_keys_in_the_url_and_oversized_bodies_are_refused(server: Server, alice: Person) -> None:
    response = httpx.post(server.url + CHAT + f"?api_key={alice.key}", json=chat(), timeout=10)
    assert _answer(response)[:2] == (401, "api_key_in_url")
    huge = chat(messages=[{"role": "user", "content": "x" * (11 * 1024 * 1024)}])
    response = httpx.post(
        server.url + CHAT, headers={"Authorization": f"Bearer {alice.key}"}, json=huge, timeout=30
    )
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"


def test_a_full_worker_queue_is_a_503_at_once_with_retry_after(
    tmp_path: Path, alice: Person
) -> None:
    base_model("test-base", tasks=["causal_lm"], context_length=256)
    client = redis.Redis.from_url(settings.REDIS_URL)
    client.delete(request_queue(queues.GPU_INFERENCE))
    with asgi_server(tmp_path / "web", INFERENCE_MAX_QUEUED="2", **ENV) as server:
        headers = {"Authorization": f"Bearer {alice.key}", "x-atelier-timeout": "20"}
        # Two requests wait for a worker that is not there; the third is refused at once.
        waiting = [
            threading.Thread(
                target=httpx.post,
                args=(server.url + CHAT,),
                kwargs={"headers": headers, "json": chat(), "timeout": 30},
            )
            for _ in range(2)
        ]
        for thread in waiting:
            thread.start()
        deadline = time.monotonic() + 10
        while client.llen(request_queue(queues.GPU_INFERENCE)) < 2:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        started = time.monotonic()
        response = httpx.post(server.url + CHAT, headers=headers, json=chat(), timeout=30)
        assert time.monotonic() - started < 2
        assert _answer(response)[:2] == (503, "overloaded")
        assert response.headers["retry-after"] == "1"
        client.delete(request_queue(queues.GPU_INFERENCE))
        for thread in waiting:
            thread.join()


def test_a_deleted_deployment_is_not_callable_a_moment_later_despite_the_cache(
    server: Server, alice: Person
) -> None:
    model = customer_model(alice, suffix="mine")
    created = alice.client.post(
        "/v1/deployments", {"model": model.pk, "type": "serverless"}, format="json"
    )
    assert created.status_code in (200, 201), created.content  # a model may come deployed
    headers = {"Authorization": f"Bearer {alice.key}", "x-atelier-timeout": "0.5"}
    body = chat(model=model.pk)
    # Resolved and cached: there is no worker, so the call times out with a 503.
    for _ in range(2):
        response = httpx.post(server.url + CHAT, headers=headers, json=body, timeout=10)
        assert _answer(response)[:2] == (503, "no_capacity")

    assert alice.client.delete(f"/v1/deployments/{created.json()['id']}").status_code in (200, 204)
    deadline = time.monotonic() + 2
    while True:  # the invalidation crosses processes over Redis: milliseconds
        response = httpx.post(server.url + CHAT, headers=headers, json=body, timeout=10)
        if response.status_code == 400 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert _answer(response)[:2] == (400, "model_not_deployed")


def test_a_caller_that_hangs_up_on_a_plain_request_stops_the_generation(
    tmp_path: Path, alice: Person
) -> None:
    from tests.support.models import tiny_model_dir

    base_model(
        "atelier-tiny-llama",
        tasks=["causal_lm"],
        context_length=256,
        uri=tiny_model_dir("llama").as_uri(),
    )
    env = {**ENV, "INFERENCE_HEARTBEAT_SECONDS": "1"}
    with (
        worker("control", tmp_path / "control", **env),
        worker("inference", tmp_path / "inference", **env),
        asgi_server(tmp_path / "web", **env) as server,
    ):
        headers = {"Authorization": f"Bearer {alice.key}", "x-request-id": "req-mine-1"}
        warm = httpx.post(
            server.url + CHAT,
            headers=headers,
            json=chat(model="atelier-tiny-llama", max_tokens=2),
            timeout=120,
        )
        assert warm.status_code == 200, warm.text
        assert warm.headers["x-request-id"] == "req-mine-1"
        assert int(warm.headers["openai-processing-ms"]) >= 0
        # Greedy, 220 tokens, never ending on its own: only the hang-up can stop it.
        long = chat(
            model="atelier-tiny-llama",
            messages=[{"role": "user", "content": "tell me everything"}],
            max_tokens=220,
            temperature=0,
        )
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(
                server.url + CHAT,
                headers={"Authorization": f"Bearer {alice.key}"},
                json=long,
                # 220 tokens take >= 200 ms here (~1 ms a token): hang up well before.
                timeout=httpx.Timeout(30, read=0.08),
            )
        deadline = time.monotonic() + 30
        while True:
            rows = list(UsageRecord.objects.for_organization(alice.organization))
            if len(rows) >= 2 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    cancelled = [r for r in rows if r.status == "cancelled"]
    assert len(cancelled) == 1, [(r.status, r.completion_tokens) for r in rows]
    assert 1 <= cancelled[0].completion_tokens < 220
