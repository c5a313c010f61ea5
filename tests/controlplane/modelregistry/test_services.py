"""Registering customer models (idempotent, versioned) and deleting them (soft, storage cleaned)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from django.core.files.base import ContentFile
from django.core.files.storage import default_storage

from controlplane.core.errors import NotFound
from controlplane.datasets.storage import object_uri
from controlplane.modelregistry import selectors, services
from controlplane.modelregistry.models import CustomerModel
from tests.support.people import Person
from tests.support.registry import base_model, customer_model

pytestmark = pytest.mark.django_db


def register(person: Person, **overrides: Any) -> CustomerModel:
    fields: dict[str, Any] = {
        "organization": person.organization,
        "base": base_model(),
        "job_id": "ftjob-1",
        "suffix": "bot",
        "kind": "final",
        "step": None,
        "uri": "file:///nonexistent/ftjob-1/final",
        "artifact_kind": "lora",
        "task": "causal_lm",
        "labels": [],
        **overrides,
    }
    return services.customer_model_register(**fields)


def test_registering_twice_returns_the_same_model(alice: Person) -> None:
    first = register(alice)
    again = register(alice, uri="file:///elsewhere", labels=["x"])

    assert again.pk == first.pk == "ft:test-base:acme:bot:ftjob-1"
    assert again.uri == "file:///nonexistent/ftjob-1/final"
    assert CustomerModel.objects.for_organization(alice.organization).count() == 1


def test_checkpoints_get_openai_style_ids_and_their_jobs_version(alice: Person) -> None:
    register(alice, job_id="ftjob-1")
    checkpoint = register(alice, job_id="ftjob-2", kind="checkpoint", step=50)
    final = register(alice, job_id="ftjob-2")

    assert checkpoint.pk == "ft:test-base:acme:bot:ftjob-2:ckpt-step-50"
    assert checkpoint.version == final.version == 2


def test_versions_count_earlier_final_models_of_the_same_base_and_suffix(
    alice: Person, charlie: Person
) -> None:
    assert register(alice, job_id="ftjob-1").version == 1
    assert register(alice, job_id="ftjob-2").version == 2
    assert register(alice, job_id="ftjob-3", suffix="other").version == 1
    assert register(alice, job_id="ftjob-4", base=base_model("other-base")).version == 1
    assert register(charlie, job_id="ftjob-5").version == 1
    deleted = register(alice, job_id="ftjob-6")
    services.customer_model_delete(organization=alice.organization, model=deleted)
    assert register(alice, job_id="ftjob-7").version == 4  # numbers are never reused


def test_an_organization_without_a_sluggable_name_uses_its_id(alice: Person) -> None:
    alice.organization.name = "!!!"
    alice.organization.save()
    model = register(alice, suffix="")
    assert model.pk == f"ft:test-base:{alice.organization.pk.replace('_', '-')}::ftjob-1"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("suffix", "has:colon"),
        ("suffix", "x" * 65),
        ("job_id", "a:b"),
        ("kind", "base"),
        ("artifact_kind", "pickle"),
        ("task", "vision"),
        ("labels", "abc"),
    ],
)
def test_invalid_registrations_are_refused(alice: Person, field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        register(alice, **{field: value})


def test_a_checkpoint_needs_a_step(alice: Person) -> None:
    with pytest.raises(ValueError, match="step"):
        register(alice, kind="checkpoint", step=None)


def test_deleting_removes_stored_objects_after_commit(
    alice: Person, django_capture_on_commit_callbacks: Any
) -> None:
    prefix = "fine-tuning/ftjob-1/final"
    default_storage.save(f"{prefix}/model.safetensors", ContentFile(b"w"))
    model = register(alice, uri=object_uri(prefix))

    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        services.customer_model_delete(organization=alice.organization, model=model)
    assert default_storage.exists(f"{prefix}/model.safetensors")  # not before commit
    for callback in callbacks:
        callback()

    assert not (Path(settings.MEDIA_ROOT) / prefix).exists()
    with pytest.raises(NotFound):
        selectors.model_for_organization(organization=alice.organization, model_id=model.pk)


def test_deleting_keeps_objects_another_live_model_points_into(
    alice: Person, django_capture_on_commit_callbacks: Any
) -> None:
    prefix = "fine-tuning/ftjob-1"
    default_storage.save(f"{prefix}/final/model.safetensors", ContentFile(b"w"))
    outer = register(alice, uri=object_uri(prefix))
    register(alice, kind="checkpoint", step=10, uri=object_uri(f"{prefix}/final"))

    with django_capture_on_commit_callbacks(execute=True):
        services.customer_model_delete(organization=alice.organization, model=outer)

    assert default_storage.exists(f"{prefix}/final/model.safetensors")


def test_objects_outside_storage_are_never_deleted(
    alice: Person, tmp_path: Path, django_capture_on_commit_callbacks: Any
) -> None:
    outside = tmp_path / "weights"
    outside.mkdir()
    (outside / "model.safetensors").write_bytes(b"w")
    model = register(alice, uri=outside.as_uri())

    with django_capture_on_commit_callbacks(execute=True):
        services.customer_model_delete(organization=alice.organization, model=model)

    assert (outside / "model.safetensors").exists()


def test_the_storage_root_is_never_deleted(
    alice: Person, django_capture_on_commit_callbacks: Any
) -> None:
    default_storage.save("files/keep.txt", ContentFile(b"keep"))
    model = register(alice, uri=Path(settings.MEDIA_ROOT).as_uri())

    with django_capture_on_commit_callbacks(execute=True):
        services.customer_model_delete(organization=alice.organization, model=model)

    assert default_storage.exists("files/keep.txt")


def test_selectors_see_base_models_and_own_models_only(alice: Person, charlie: Person) -> None:
    base = base_model("atelier-tiny-llama")
    theirs = customer_model(charlie, base=base)

    assert selectors.base_model_get("atelier-tiny-llama") == base
    for model_id in ("nope", theirs.pk, "ft:atelier-tiny-llama"):
        with pytest.raises(NotFound) as caught:
            selectors.model_for_organization(organization=alice.organization, model_id=model_id)
        assert caught.value.code == "model_not_found"
    with pytest.raises(NotFound):
        selectors.base_model_get(theirs.pk)
    assert selectors.models_visible(alice.organization) == [base]
