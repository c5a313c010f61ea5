"""The OpenAPI schema documents the four inference endpoints though Django never serves
them (the serving router answers first): request bodies, scope and error responses."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from django.core.management import call_command

from tests.support.people import Person
from tests.support.serving import serve

INFERENCE = {
    "/v1/chat/completions": "ChatInputRequest",
    "/v1/completions": "CompletionInputRequest",
    "/v1/embeddings": "EmbeddingInputRequest",
    "/v1/classifications": "ClassificationInputRequest",
}


def test_the_schema_validates_and_documents_every_inference_endpoint(tmp_path: Path) -> None:
    out = tmp_path / "schema.yaml"
    call_command("spectacular", "--validate", "--fail-on-warn", "--file", str(out))
    spec = yaml.safe_load(out.read_text())
    for path, body in INFERENCE.items():
        post = spec["paths"][path]["post"]
        schema = post["requestBody"]["content"]["application/json"]["schema"]
        assert schema == {"$ref": f"#/components/schemas/{body}"}, path
        assert post["security"] == [{"ApiKey": []}], path
        for status in ("400", "401", "403", "404", "429", "503"):
            error = post["responses"][status]["content"]["application/json"]["schema"]
            assert error == {"$ref": "#/components/schemas/Error"}, (path, status)
    detail = spec["components"]["schemas"]["ErrorDetail"]["properties"]
    assert set(detail) == {"message", "type", "param", "code"}


@pytest.mark.django_db
def test_the_django_views_at_those_urls_never_serve_a_request(alice: Person) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    through_django = alice.client.post("/v1/chat/completions", body, format="json")
    assert through_django.status_code == 503
    assert "ASGI" in through_django.json()["error"]["message"]
    # The application `atelier web` serves answers it (here: no such model).
    served = serve("/v1/chat/completions", body, key=alice.key)
    assert (served.status_code, served.json()["error"]["code"]) == (404, "model_not_found")
