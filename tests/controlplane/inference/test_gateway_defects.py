"""Issue 19 at the inference front door, through the real ASGI application
(`controlplane.asgi.application`: the body limit, the serving router, Django behind):

- a request naming a missing model leaves nothing of itself behind (the cached
  "no such model" answer used to be one exception object, re-raised on every hit,
  whose traceback grew by each request's frames and their bodies);
- a chunked body over the limit is a 413 in OpenAI's shape, read no further than
  the limit and a chunk;
- a Host outside ALLOWED_HOSTS is a 400 on the serving path as it is on Django.
"""

from __future__ import annotations

import gc
import tracemalloc
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from asgiref.sync import sync_to_async
from django.db import connections

from controlplane.serving.endpoints import ENDPOINTS
from tests.support.people import Person

pytestmark = pytest.mark.django_db(transaction=True)

CHAT = "/v1/chat/completions"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def app(anyio_backend: str) -> AsyncIterator[Any]:
    from controlplane.asgi import application

    yield application
    # The database connection the app's sync_to_async thread opened: let the test
    # database go at the end of the run.
    await sync_to_async(connections.close_all)()


def _client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver")


def _body(path: str, model: str, padding: int = 0) -> dict[str, Any]:
    text = "x" * padding or "hi"
    if path == CHAT:
        return {"model": model, "messages": [{"role": "user", "content": text}]}
    if path == "/v1/completions":
        return {"model": model, "prompt": text}
    return {"model": model, "input": text}


def _openai_error(response: httpx.Response) -> dict[str, Any]:
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    return dict(error)


# --- item 2: a refused request leaves nothing behind ---------------------------------------


async def _held_by(app: Any, key: str, bodies: list[dict[str, Any]]) -> int:
    """Bytes still allocated, after a collection, once `bodies` have each been refused."""
    headers = {"Authorization": f"Bearer {key}"}
    async with _client(app) as client:

        async def ask(body: dict[str, Any]) -> None:
            response = await client.post(CHAT, json=body, headers=headers)
            assert response.status_code == 404, response.content
            assert _openai_error(response)["code"] == "model_not_found"

        for _ in range(3):  # warm up: the key cache, connections, the cached answer
            await ask(_body(CHAT, "no-such-model"))
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            for body in bodies:
                await ask(body)
            gc.collect()
            return tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()


@pytest.mark.anyio
async def test_requests_for_a_missing_model_leave_nothing_of_themselves_behind(
    app: Any, alice: Person
) -> None:
    # Each body is ~200 KB (parsed, as much again); each is answered from the cache.
    bodies = [_body(CHAT, "no-such-model", padding=200_000) for _ in range(40)]
    held = await _held_by(app, alice.key, bodies)
    # Before the fix these 40 requests stayed reachable from the cache: ~25 MB.
    assert held < 2_000_000, f"{held} bytes kept after 40 refused requests"


@pytest.mark.anyio
async def test_each_refusal_from_the_model_cache_is_a_fresh_error(
    app: Any, alice: Person, monkeypatch: pytest.MonkeyPatch
) -> None:
    from controlplane.serving import gateway

    raised: list[BaseException] = []
    real_get = gateway.model_refs.get

    def spying_get(*args: Any) -> Any:
        try:
            return real_get(*args)
        except BaseException as error:
            raised.append(error)
            raise

    monkeypatch.setattr(gateway.model_refs, "get", spying_get)
    async with _client(app) as client:
        for _ in range(4):
            response = await client.post(
                CHAT,
                json=_body(CHAT, "no-such-model"),
                headers={"Authorization": f"Bearer {alice.key}"},
            )
            assert response.status_code == 404
            assert _openai_error(response)["code"] == "model_not_found"
    assert len(raised) == 3  # the first request missed the cache; the others hit it
    assert len({id(error) for error in raised}) == 3, "one error object raised again"


# --- item 8b: a chunked body over the limit -----------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("path", sorted(ENDPOINTS))
async def test_an_oversized_chunked_body_is_413_read_no_further_than_the_limit(
    app: Any, alice: Person, settings: Any, path: str
) -> None:
    chunk = b" " * 65536
    limit = settings.MAX_REQUEST_BODY_BYTES
    offered = 3 * limit // len(chunk)
    sent = 0

    async def body() -> AsyncIterator[bytes]:
        nonlocal sent
        yield b'{"model": "test-base", "input": "'
        for _ in range(offered):
            sent += 1
            yield chunk
        yield b'"}'

    async with _client(app) as client:
        response = await client.post(
            path,
            content=body(),
            headers={"Authorization": f"Bearer {alice.key}", "content-type": "application/json"},
        )
        assert response.request.headers.get("transfer-encoding") == "chunked"
        assert "content-length" not in response.request.headers
    assert response.status_code == 413, response.content
    error = _openai_error(response)
    assert error["code"] == "request_too_large"
    assert str(limit) in error["message"]
    assert response.headers["x-request-id"]
    assert sent <= limit // len(chunk) + 2, f"read {sent} chunks of {offered}"


@pytest.mark.anyio
async def test_a_chunked_body_under_the_limit_is_read_whole_on_the_serving_path(
    app: Any, alice: Person
) -> None:
    async def body() -> AsyncIterator[bytes]:
        yield b'{"model": "no-such-model", '
        yield b'"messages": [{"role": "user", "content": "hi"}]}'

    async with _client(app) as client:
        response = await client.post(
            CHAT,
            content=body(),
            headers={"Authorization": f"Bearer {alice.key}", "content-type": "application/json"},
        )
    assert response.status_code == 404, response.content
    assert _openai_error(response)["code"] == "model_not_found"


# --- item 8c: ALLOWED_HOSTS on the serving path ----------------------------------------------


async def _answer_for_host(app: Any, key: str, path: str, host: str) -> tuple[int, Any]:
    async with _client(app) as client:
        response = await client.post(
            path,
            json=_body(path, "no-such-model"),
            headers={"Authorization": f"Bearer {key}", "Host": host},
        )
    if response.headers.get("content-type", "").startswith("application/json"):
        return response.status_code, _openai_error(response)["code"]
    return response.status_code, None


@pytest.mark.anyio
@pytest.mark.parametrize("path", sorted(ENDPOINTS))
async def test_a_host_outside_allowed_hosts_is_400_as_django_answers_it(
    app: Any, alice: Person, path: str
) -> None:
    for host in ("evil.example", "testserver.evil.example"):
        assert await _answer_for_host(app, alice.key, path, host) == (400, "bad_request")
        # Django's own answer for a URL it serves (the uploads endpoint, also a POST).
        assert await _answer_for_host(app, alice.key, "/v1/uploads", host) == (
            400,
            "bad_request",
        ), host
    assert await _answer_for_host(app, alice.key, path, "testserver") == (404, "model_not_found")


@pytest.mark.anyio
async def test_the_serving_path_reads_the_host_as_django_does(
    app: Any, alice: Person, settings: Any
) -> None:
    # DEBUG with no ALLOWED_HOSTS: Django's localhost defaults.
    settings.DEBUG = True
    settings.ALLOWED_HOSTS = []
    for host, status in [
        ("localhost:8000", 404),
        ("api.localhost", 404),
        ("127.0.0.1", 404),
        ("[::1]:8000", 404),
        ("testserver", 400),
        ("evil.example", 400),
    ]:
        assert (await _answer_for_host(app, alice.key, CHAT, host))[0] == status, host
    # X-Forwarded-Host counts exactly when USE_X_FORWARDED_HOST says so.
    settings.DEBUG = False
    settings.ALLOWED_HOSTS = ["api.example.com"]
    for forwarded, status in [(False, 400), (True, 404)]:
        settings.USE_X_FORWARDED_HOST = forwarded
        async with _client(app) as client:
            response = await client.post(
                CHAT,
                json=_body(CHAT, "no-such-model"),
                headers={
                    "Authorization": f"Bearer {alice.key}",
                    "Host": "internal:8000",
                    "X-Forwarded-Host": "api.example.com",
                },
            )
        assert response.status_code == status, forwarded


@pytest.mark.anyio
async def test_a_bad_host_is_refused_before_the_key_or_body_is_looked_at(app: Any) -> None:
    async with _client(app) as client:
        response = await client.post(CHAT, content=b"{not json", headers={"Host": "evil.example"})
    assert response.status_code == 400
    assert _openai_error(response)["code"] == "bad_request"
    assert response.headers["x-request-id"]
