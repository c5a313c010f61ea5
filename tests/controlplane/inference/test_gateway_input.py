"""Bad input to the inference endpoints: a clear error before anything reaches a worker.

Through the serving router, in-process (`tests.support.serving`)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import redis
from django.conf import settings

from jobcontracts import queues
from jobcontracts.inference import request_queue
from tests.support.jobs import purge_broker, sent_specs
from tests.support.people import Person, client_with
from tests.support.registry import base_model, customer_model
from tests.support.serving import serve

pytestmark = pytest.mark.django_db

CHAT = "/v1/chat/completions"


@pytest.fixture(autouse=True)
def _models(db: None) -> Iterator[None]:
    purge_broker()
    base_model("test-base", tasks=["causal_lm"], context_length=256)
    base_model("test-embedder", family="bert", tasks=["embeddings"], context_length=512)
    yield
    purge_broker()
    redis.Redis.from_url(settings.REDIS_URL).delete(request_queue(queues.GPU_INFERENCE))


def post(person: Person, path: str, body: Any) -> Any:
    return serve(path, body, key=person.key)


def queued() -> int:
    return int(redis.Redis.from_url(settings.REDIS_URL).llen(request_queue(queues.GPU_INFERENCE)))


def chat(**extra: Any) -> dict[str, Any]:
    return {"model": "test-base", "messages": [{"role": "user", "content": "hi"}], **extra}


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (chat(messages=[]), "messages"),
        (chat(messages=[{"role": "wizard", "content": "hi"}]), "messages"),
        (chat(messages=[{"role": "user", "content": 42}]), "messages"),
        (chat(messages=[{"role": "user", "content": [{"type": "image_url"}]}]), "messages"),
        (chat(messages=[{"role": "tool", "content": "x"}]), "messages"),
        (chat(messages="hi"), "messages"),
        (chat(n=99), "n"),
        (chat(n=0), "n"),
        (chat(temperature=5), "temperature"),
        (chat(top_p=-1), "top_p"),
        (chat(max_tokens=0), "max_tokens"),
        (chat(max_tokens=100_000), "max_tokens"),
        (chat(stop=["a", "b", "c", "d", "e"]), "stop"),
        (chat(stop=[1]), "stop"),
        (chat(frequency_penalty=1.5), "frequency_penalty"),
        (chat(top_logprobs=3), "top_logprobs"),
        (chat(stream_options={"include_usage": True}), "stream_options"),
        (chat(tools=[{"type": "function"}]), "tools"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "model"),
    ],
)
def test_bad_chat_requests_are_400_naming_the_field(
    alice: Person, body: dict[str, Any], param: str
) -> None:
    response = post(alice, CHAT, body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert param in (error["param"] or "") + error["message"]
    assert sent_specs() == []  # nothing reached a worker
    assert queued() == 0


def test_max_tokens_beyond_the_models_context_is_refused(alice: Person) -> None:
    response = post(alice, CHAT, chat(max_tokens=300))  # the model holds 256 tokens
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "context_length_exceeded"


def test_unknown_foreign_and_undeployed_models(alice: Person, charlie: Person) -> None:
    unknown = post(alice, CHAT, chat(model="gpt-17"))
    assert unknown.status_code == 404
    assert unknown.json()["error"]["code"] == "model_not_found"

    foreign = customer_model(charlie, suffix="theirs")
    response = post(alice, CHAT, chat(model=foreign.pk))
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "model_not_found"

    mine = customer_model(alice, suffix="mine", kind="checkpoint", step=3)
    response = post(alice, CHAT, chat(model=mine.pk))
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "model_not_deployed"


def test_a_model_that_cannot_serve_the_endpoint_is_refused(alice: Person) -> None:
    response = post(alice, "/v1/embeddings", {"model": "test-base", "input": "hi"})
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "model_not_supported"
    response = post(alice, CHAT, chat(model="test-embedder"))
    assert response.status_code == 400


@pytest.mark.parametrize(
    "body",
    [
        {"model": "test-embedder", "input": "hi", "encoding_format": "hex"},
        {"model": "test-embedder", "input": []},
        {"model": "test-embedder", "input": [1, 2, 3]},
        {"model": "test-embedder", "input": ""},
        {"model": "test-embedder", "input": "hi", "dimensions": 0},
    ],
)
def test_bad_embedding_requests_are_400(alice: Person, body: dict[str, Any]) -> None:
    assert post(alice, "/v1/embeddings", body).status_code == 400


def test_malformed_json_and_huge_prompts(alice: Person) -> None:
    response = serve(CHAT, content=b"{nope", key=alice.key)
    assert response.status_code == 400
    assert "error" in response.json()
    huge = chat(messages=[{"role": "user", "content": "x" * (10 * 1024 * 1024)}])
    response = post(alice, CHAT, huge)
    assert response.status_code in (400, 413)


def test_keys_need_the_inference_scope_and_an_inference_key_can_do_nothing_else(
    alice: Person,
) -> None:
    assert serve(CHAT, chat()).status_code == 401
    created = alice.client.post(
        "/v1/organization/api_keys", {"name": "app", "scopes": ["inference"]}, format="json"
    ).json()
    app = client_with(created["value"])
    assert app.get("/v1/files").status_code == 403
    assert app.get("/v1/fine_tuning/jobs").status_code == 403
    reader = alice.client.post(
        "/v1/organization/api_keys", {"name": "r", "scopes": ["read_only"]}, format="json"
    ).json()
    response = serve(CHAT, chat(), key=reader["value"])
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "missing_scope"


def test_with_no_worker_the_caller_gets_a_clean_503_not_a_hang(alice: Person) -> None:
    response = serve(CHAT, chat(), key=alice.key, headers={"x-atelier-timeout": "0.5"})
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "no_capacity"
    assert response.headers["Retry-After"] == "1"
