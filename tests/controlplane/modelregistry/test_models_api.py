"""`/v1/models`: base models for everyone, fine-tuned models for their organization only."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import openai
import pytest
from django.conf import settings
from django.core.files.base import ContentFile
from django.core.files.storage import default_storage
from rest_framework.test import APIClient

from controlplane.datasets.storage import object_uri
from controlplane.modelregistry.models import BaseModel, CustomerModel
from tests.support.people import Person, join
from tests.support.registry import base_model, customer_model

pytestmark = pytest.mark.django_db


def ids(body: dict[str, Any]) -> list[str]:
    return [m["id"] for m in body["data"]]


def test_listing_shows_active_base_models_and_only_the_callers_own_models(
    alice: Person, charlie: Person
) -> None:
    base = base_model("atelier-tiny-llama")
    base_model("retired", is_active=False)
    mine = customer_model(alice, base=base, suffix="support")
    theirs = customer_model(charlie, base=base, suffix="secret")

    body = alice.client.get("/v1/models").json()

    assert body["object"] == "list"
    assert ids(body) == ["atelier-tiny-llama", mine.pk]
    assert ids(charlie.client.get("/v1/models").json()) == ["atelier-tiny-llama", theirs.pk]


def test_model_objects_have_openai_fields_and_ours(alice: Person) -> None:
    base = base_model("atelier-tiny-llama")
    mine = customer_model(alice, base=base, suffix="support", job_id="ftjob-abc")

    listed = {m["id"]: m for m in alice.client.get("/v1/models").json()["data"]}

    assert listed["atelier-tiny-llama"] == {
        "id": "atelier-tiny-llama",
        "object": "model",
        "created": int(base.created_at.timestamp()),
        "owned_by": "atelier",
        "kind": "base",
        "family": "llama",
        "context_length": 256,
        "tasks": ["causal_lm", "classification"],
        "methods": ["supervised", "dpo"],
        "adapters": ["lora", "full"],
        "price_per_1k_training_tokens": "0.000800",
        "description": "",
        "base_model": None,
        "job_id": None,
        "suffix": None,
        "step": None,
        "version": None,
        "artifact_kind": None,
        "labels": None,
        "compression": None,
    }
    assert mine.pk == "ft:atelier-tiny-llama:acme:support:ftjob-abc"
    fine_tuned = listed[mine.pk]
    assert fine_tuned["owned_by"] == alice.organization.pk
    assert fine_tuned["kind"] == "final"
    assert fine_tuned["base_model"] == "atelier-tiny-llama"
    assert fine_tuned["job_id"] == "ftjob-abc"
    assert fine_tuned["version"] == 1


def test_retrieve_a_base_model_and_an_own_model_whose_id_has_colons(alice: Person) -> None:
    base_model("atelier-tiny-llama")
    checkpoint = customer_model(alice, suffix="s", job_id="ftjob-x", kind="checkpoint", step=40)

    assert alice.client.get("/v1/models/atelier-tiny-llama").json()["id"] == "atelier-tiny-llama"
    body = alice.client.get(f"/v1/models/{checkpoint.pk}").json()
    assert body["id"] == "ft:test-base:acme:s:ftjob-x:ckpt-step-40"
    assert body["kind"] == "checkpoint"
    assert body["step"] == 40


def test_outsider_gets_404_model_not_found_for_a_foreign_model(
    alice: Person, charlie: Person
) -> None:
    theirs = customer_model(charlie, suffix="secret")

    foreign = alice.client.get(f"/v1/models/{theirs.pk}")
    unknown = alice.client.get(f"/v1/models/{theirs.pk[:-4]}zzzz")

    assert foreign.status_code == unknown.status_code == 404
    assert foreign.json()["error"]["code"] == unknown.json()["error"]["code"] == "model_not_found"
    assert "does not exist or you do not have access to it" in foreign.json()["error"]["message"]
    assert alice.client.delete(f"/v1/models/{theirs.pk}").status_code == 404
    assert CustomerModel.objects.for_organization(charlie.organization).get().deleted_at is None


@pytest.mark.parametrize(
    "model_id",
    [
        "nope",
        "ft:",
        "ft:test-base:acme::",
        "a" * 400,
        "x%00y",
        "has%20space",
        "caf%C3%A9",
        "a/b/c",
        "..%2F..%2Fetc",
        "retired",
    ],
)
def test_malformed_and_unknown_ids_are_404_model_not_found(alice: Person, model_id: str) -> None:
    base_model("retired", is_active=False)
    response = alice.client.get(f"/v1/models/{model_id}")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "model_not_found"


def test_owner_deletes_an_own_model_which_then_disappears(
    alice: Person, django_capture_on_commit_callbacks: Any
) -> None:
    prefix = "models/acme/ftjob-1/final"
    default_storage.save(f"{prefix}/adapter_model.safetensors", ContentFile(b"weights"))
    default_storage.save(f"{prefix}/sub/config.json", ContentFile(b"{}"))
    model = customer_model(alice, job_id="ftjob-1", uri=object_uri(prefix))

    with django_capture_on_commit_callbacks(execute=True):
        response = alice.client.delete(f"/v1/models/{model.pk}")

    assert response.status_code == 200
    assert response.json() == {"id": model.pk, "object": "model", "deleted": True}
    assert alice.client.get(f"/v1/models/{model.pk}").status_code == 404
    assert model.pk not in ids(alice.client.get("/v1/models").json())
    assert not (Path(settings.MEDIA_ROOT) / prefix).exists()
    # Deleting again: the model is gone, like any unknown id.
    assert alice.client.delete(f"/v1/models/{model.pk}").json()["error"]["code"] == (
        "model_not_found"
    )


def test_deleting_needs_the_owner_role(alice: Person, bob: Person) -> None:
    model = customer_model(alice)

    response = bob.client.delete(f"/v1/models/{model.pk}")

    assert response.status_code == 403
    assert response.json()["error"]["code"] == "insufficient_role"
    assert "owners" in response.json()["error"]["message"]
    assert bob.client.get(f"/v1/models/{model.pk}").status_code == 200  # reading is fine


def test_an_admin_cannot_delete_through_a_service_key(alice: Person) -> None:
    model = customer_model(alice)
    admin = join(alice.organization, "ada@acme.test", "admin")
    created = admin.client.post(
        "/v1/organization/api_keys", {"name": "ci", "service_account": True}, format="json"
    )
    service_key = created.json()["value"]
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {service_key}")

    assert client.get(f"/v1/models/{model.pk}").status_code == 200
    assert client.delete(f"/v1/models/{model.pk}").status_code == 403


def test_base_models_cannot_be_deleted(alice: Person) -> None:
    base_model("atelier-tiny-llama")

    response = alice.client.delete("/v1/models/atelier-tiny-llama")

    assert response.status_code == 403
    assert response.json()["error"]["code"] == "cannot_delete_base_model"
    assert "base model" in response.json()["error"]["message"]
    assert BaseModel.objects.filter(pk="atelier-tiny-llama").exists()


def test_a_key_without_models_scope_is_refused(alice: Person) -> None:
    created = alice.client.post(
        "/v1/organization/api_keys", {"name": "files only", "scopes": ["files.read"]}, format="json"
    )
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {created.json()['value']}")

    response = client.get("/v1/models")

    assert response.status_code == 403
    assert "models.read" in response.json()["error"]["message"]


@pytest.mark.parametrize(
    ("method", "path"),
    [("get", "/v1/models"), ("get", "/v1/models/x"), ("delete", "/v1/models/ft:a:b::c")],
)
def test_unauthenticated_requests_get_401(db: None, method: str, path: str) -> None:
    response = getattr(APIClient(), method)(path)
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "missing_api_key"


def test_the_openai_sdk_lists_retrieves_and_deletes_models(
    sdk: openai.OpenAI, alice: Person, charlie: Person
) -> None:
    base = base_model("atelier-tiny-llama")
    mine = customer_model(alice, base=base, suffix="support")
    theirs = customer_model(charlie, base=base)

    listed = sdk.models.list()
    assert [m.id for m in listed] == ["atelier-tiny-llama", mine.pk]
    assert listed.data[0].owned_by == "atelier"
    retrieved = sdk.models.retrieve(mine.pk)
    assert retrieved.id == mine.pk
    assert retrieved.object == "model"
    assert retrieved.owned_by == alice.organization.pk
    assert (retrieved.model_extra or {})["base_model"] == "atelier-tiny-llama"
    with pytest.raises(openai.NotFoundError) as caught:
        sdk.models.retrieve(theirs.pk)
    assert caught.value.code == "model_not_found"
    with pytest.raises(openai.PermissionDeniedError):
        sdk.models.delete("atelier-tiny-llama")

    deleted = sdk.models.delete(mine.pk)

    assert deleted.id == mine.pk
    assert deleted.deleted is True
    assert [m.id for m in sdk.models.list()] == ["atelier-tiny-llama"]
