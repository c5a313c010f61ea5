"""Through the real ASGI server (uvicorn), with the official `openai` SDK as the client."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.support.people import Person, sign_up
from tests.support.processes import Server, asgi_server

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]


@pytest.fixture(scope="module")
def server(
    django_db_setup: None, django_db_blocker: object, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    with asgi_server(tmp_path_factory.mktemp("web")) as running:
        yield running


def sdk(server: Server, key: str) -> openai.OpenAI:
    return openai.OpenAI(api_key=key, base_url=server.url + "/v1", max_retries=0)


@pytest.fixture
def people(transactional_db: None) -> tuple[Person, Person]:
    return sign_up("alice@acme.test", "Acme"), sign_up("charlie@globex.test", "Globex")


def test_sdk_gets_authentication_error_for_a_bad_key(server: Server, people: object) -> None:
    with pytest.raises(openai.AuthenticationError) as caught:
        sdk(server, "atl_live_garbage").get("/me", cast_to=object)

    assert caught.value.status_code == 401
    assert caught.value.code == "invalid_api_key"
    assert caught.value.type == "invalid_request_error"
    assert caught.value.request_id


def test_sdk_calls_an_authenticated_endpoint(server: Server, people: tuple[Person, Person]) -> None:
    alice, _ = people
    me = sdk(server, alice.key).get("/me", cast_to=dict)
    assert me["organization"]["id"] == alice.organization.pk


def test_sdk_gets_not_found_for_a_foreign_id_and_permission_error_for_a_scope(
    server: Server, people: tuple[Person, Person]
) -> None:
    alice, charlie = people
    client = sdk(server, alice.key)
    foreign = sdk(server, charlie.key).get("/organization/api_keys", cast_to=dict)["data"][0]

    with pytest.raises(openai.NotFoundError):
        client.get(f"/organization/api_keys/{foreign['id']}", cast_to=object)

    inference = client.post(
        "/organization/api_keys", cast_to=dict, body={"name": "app", "scopes": ["inference"]}
    )
    with pytest.raises(openai.PermissionDeniedError) as caught:
        sdk(server, inference["value"]).get("/organization/api_keys", cast_to=object)
    assert caught.value.code == "missing_scope"
    assert "organization.read" in caught.value.body["message"]  # type: ignore[index]


def test_sdk_conflicts_are_not_retried(server: Server, people: tuple[Person, Person]) -> None:
    alice, _ = people
    client = openai.OpenAI(api_key=alice.key, base_url=server.url + "/v1", max_retries=2)
    client.post("/organization/members", cast_to=dict, body={"email": "x@acme.test"})
    before = len(server.log_lines())

    with pytest.raises(openai.ConflictError):
        client.post("/organization/members", cast_to=dict, body={"email": "x@acme.test"})

    requests = [
        json.loads(line) for line in server.log_lines()[before:] if '"http.request"' in line
    ]
    assert len(requests) == 1


def test_logs_are_json_with_the_request_id_of_each_request(
    server: Server, people: tuple[Person, Person]
) -> None:
    alice, _ = people
    response = httpx.get(
        server.url + "/v1/me",
        headers={"authorization": f"Bearer {alice.key}", "x-request-id": "trace-e2e-1"},
    )
    assert response.headers["x-request-id"] == "trace-e2e-1"

    entries = [json.loads(line) for line in server.log_lines() if line.startswith("{")]
    mine = [e for e in entries if e.get("request_id") == "trace-e2e-1"]
    assert mine, "the request's log line carries its request id"
    assert mine[-1]["event"] == "http.request"
    assert mine[-1]["status"] == 200
    assert mine[-1]["organization_id"] == alice.organization.pk
    assert all("request_id" in e for e in entries if e.get("event") == "http.request")


def test_body_limit_applies_on_the_real_server(server: Server, people: object) -> None:
    response = httpx.post(
        server.url + "/v1/signup",
        content=b"x" * (2 * 1024 * 1024),
        headers={"content-type": "application/json"},
    )
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"


def test_healthz_and_readyz_on_the_real_server(server: Server, people: object) -> None:
    assert httpx.get(server.url + "/healthz").json() == {"status": "ok"}
    ready = httpx.get(server.url + "/readyz")
    assert ready.status_code == 200, ready.text
    assert set(ready.json()["checks"]) == {"database", "broker", "storage"}


def test_server_log_has_no_tracebacks(server: Server, tmp_path: Path) -> None:
    assert "Traceback" not in server.log.read_text()


def test_revocation_reaches_the_server_process_at_once(
    server: Server, people: tuple[Person, Person]
) -> None:
    import time

    from controlplane.accounts.models import APIKey
    from controlplane.accounts.services import api_key_revoke
    from tests.support.people import SYSTEM

    alice, _ = people
    headers = {"authorization": f"Bearer {alice.key}"}
    # Warm the server's key cache (its invalidation listener subscribes on first use).
    for _ in range(10):
        assert httpx.get(server.url + "/v1/me", headers=headers).status_code == 200
        time.sleep(0.05)

    api_key_revoke(
        api_key=APIKey.objects.for_organization(alice.organization).get(),
        principal=None,
        actor=SYSTEM,
    )  # in this process: the server learns it over Redis
    started = time.monotonic()
    status = 200
    while status == 200 and time.monotonic() - started < 5:
        status = httpx.get(server.url + "/v1/me", headers=headers).status_code

    assert status == 401
