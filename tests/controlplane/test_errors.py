"""OpenAI-shaped errors everywhere under /v1/, request ids, and body limits."""

from __future__ import annotations

import json

import httpx
import pytest
from django.test import override_settings
from rest_framework.test import APIClient

from tests.support.people import Person

pytestmark = pytest.mark.django_db


def assert_openai_error(response: object, status: int) -> dict[str, object]:
    assert response.status_code == status, response.content  # type: ignore[attr-defined]
    assert response["content-type"].startswith("application/json")  # type: ignore[index]
    error = json.loads(response.content)["error"]  # type: ignore[attr-defined]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    return error  # type: ignore[no-any-return]


def test_unknown_url_is_a_json_404(db: None) -> None:
    error = assert_openai_error(APIClient().get("/v1/nothing/here"), 404)
    assert error["code"] == "unknown_url"


@override_settings(DEBUG=True)
def test_unknown_url_is_json_even_in_debug(db: None) -> None:
    assert_openai_error(APIClient().post("/v1/nothing"), 404)


def test_wrong_method_is_a_json_405(alice: Person) -> None:
    error = assert_openai_error(alice.client.put("/v1/organization/api_keys"), 405)
    assert error["code"] == "method_not_allowed"


def test_malformed_json_is_400(alice: Person) -> None:
    response = alice.client.post(
        "/v1/organization/api_keys", data="{not json", content_type="application/json"
    )
    error = assert_openai_error(response, 400)
    assert error["code"] == "invalid_json"


@pytest.mark.parametrize("body", ["[]", '"a string"', "42", "null"])
def test_a_body_that_is_not_an_object_is_400(alice: Person, body: str) -> None:
    response = alice.client.post(
        "/v1/organization/api_keys", data=body, content_type="application/json"
    )
    assert_openai_error(response, 400)


def test_unsupported_media_type_is_415(alice: Person) -> None:
    response = alice.client.post(
        "/v1/organization/api_keys", data="name=x", content_type="application/x-www-form-urlencoded"
    )
    assert_openai_error(response, 415)


def test_unhandled_exception_is_a_json_500_with_request_id(
    alice: Person, monkeypatch: pytest.MonkeyPatch
) -> None:
    from controlplane.accounts import apis

    def boom(*args: object, **kwargs: object) -> None:
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(apis, "api_key_out", boom)
    response = alice.client.get("/v1/organization/api_keys")

    error = assert_openai_error(response, 500)
    assert "secret internal detail" not in str(error["message"])
    assert response["x-request-id"]


def test_every_response_carries_a_request_id(alice: Person) -> None:
    ok = alice.client.get("/v1/me")
    err = APIClient().get("/v1/me")
    assert ok["x-request-id"].startswith("req_")
    assert err["x-request-id"] != ok["x-request-id"]


def test_a_sane_caller_request_id_is_echoed_and_an_unsafe_one_replaced(alice: Person) -> None:
    echoed = alice.client.get("/v1/me", HTTP_X_REQUEST_ID="trace-42.abc")
    replaced = alice.client.get("/v1/me", HTTP_X_REQUEST_ID="bad id\nwith newline")
    assert echoed["x-request-id"] == "trace-42.abc"
    assert replaced["x-request-id"].startswith("req_")


def test_schema_and_docs_are_served_without_a_cdn(db: None) -> None:
    client = APIClient()
    schema = client.get("/v1/schema", HTTP_ACCEPT="application/vnd.oai.openapi+json")
    docs = client.get("/docs")

    assert schema.status_code == 200
    spec = json.loads(schema.content)
    assert spec["openapi"].startswith("3.")
    assert "/v1/organization/api_keys" in spec["paths"]
    assert docs.status_code == 200
    html = docs.content.decode()
    assert "swagger-ui" in html
    assert "cdn" not in html.lower()
    assert "https://" not in html


# --- body limits: through the real ASGI application ---------------------------------------


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def asgi_client(transactional_db: None) -> httpx.AsyncClient:
    from controlplane.asgi import application

    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=application), base_url="http://testserver"
    )


@pytest.mark.anyio
async def test_oversized_declared_body_is_413_before_it_is_read(
    asgi_client: httpx.AsyncClient,
) -> None:
    from django.conf import settings

    payload = b"{" + b" " * settings.MAX_REQUEST_BODY_BYTES + b"}"
    response = await asgi_client.post(
        "/v1/signup", content=payload, headers={"content-type": "application/json"}
    )

    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"
    assert str(settings.MAX_REQUEST_BODY_BYTES) in response.json()["error"]["message"]
    assert response.headers["x-request-id"]


@pytest.mark.anyio
async def test_oversized_chunked_body_is_413(asgi_client: httpx.AsyncClient) -> None:
    from django.conf import settings

    chunk = b" " * 65536
    chunks = settings.MAX_REQUEST_BODY_BYTES // len(chunk) + 2

    async def stream():  # type: ignore[no-untyped-def]
        for _ in range(chunks):
            yield chunk

    response = await asgi_client.post(
        "/v1/signup", content=stream(), headers={"content-type": "application/json"}
    )
    assert response.status_code == 413


@pytest.mark.anyio
async def test_a_body_under_the_limit_goes_through(asgi_client: httpx.AsyncClient) -> None:
    response = await asgi_client.post(
        "/v1/signup",
        json={
            "email": "asgi@x.test",
            "password": "a long and unusual passphrase",
            "organization_name": "Asgi",
        },
    )
    assert response.status_code == 201
