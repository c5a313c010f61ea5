"""Bad input to the jobs API: a clear error, and nothing created."""

from __future__ import annotations

from typing import Any

import pytest

from controlplane.jobs.models import Job
from tests.support.jobs import (
    TINY_LLAMA,
    chat_rows,
    create_job,
    register_tiny_llama,
    upload_file,
)
from tests.support.people import Person, client_with, join

pytestmark = pytest.mark.django_db


@pytest.fixture
def chat_file(alice: Person, django_capture_on_commit_callbacks: Any) -> str:
    register_tiny_llama()
    return upload_file(alice, chat_rows(20), django_capture_on_commit_callbacks)


def refused(person: Person, captured: Any, status: int, **body: Any) -> dict[str, Any]:
    response = create_job(person, captured, **body)
    assert response.status_code == status, response.content
    assert not Job.objects.for_organization(person.organization).exists()
    return response.json()["error"]  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"n_epochs": 0}, "n_epochs"),
        ({"n_epochs": 1000}, "n_epochs"),
        ({"n_epochs": "many"}, "n_epochs"),
        ({"batch_size": 1.5}, "batch_size"),
        ({"learning_rate_multiplier": -1}, "learning_rate_multiplier"),
        ({"surprise": 1}, "surprise"),
    ],
)
def test_bad_hyperparameters_are_refused_naming_the_field(
    alice: Person, chat_file: str, django_capture_on_commit_callbacks: Any, body: Any, param: str
) -> None:
    error = refused(
        alice,
        django_capture_on_commit_callbacks,
        400,
        model=TINY_LLAMA,
        training_file=chat_file,
        method={"type": "supervised", "supervised": {"hyperparameters": body}},
    )
    assert param in (error["param"] or "") + error["message"]


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"suffix": "has spaces!"}, "suffix"),
        ({"suffix": "x" * 65}, "suffix"),
        ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata"),
        ({"seed": -1}, "seed"),
        ({"task": "painting"}, "task"),
        ({"adapter": {"type": "lora", "r": 0}}, "r"),
        ({"adapter": {"type": "qlora"}}, "type"),
        ({"gpus": 0}, "gpus"),
        ({"dataset": "dsv_x"}, "training_file"),  # both a file and a dataset
        ({"method": {"type": "rl"}}, "type"),
    ],
)
def test_bad_fields_are_refused(
    alice: Person, chat_file: str, django_capture_on_commit_callbacks: Any, extra: Any, param: str
) -> None:
    error = refused(
        alice,
        django_capture_on_commit_callbacks,
        400,
        model=TINY_LLAMA,
        training_file=chat_file,
        **extra,
    )
    assert param in (error["param"] or "") + error["message"]


def test_unknown_model_is_a_404_model_not_found(
    alice: Person, chat_file: str, django_capture_on_commit_callbacks: Any
) -> None:
    error = refused(
        alice, django_capture_on_commit_callbacks, 404, model="gpt-17", training_file=chat_file
    )
    assert error["code"] == "model_not_found"


def test_a_foreign_training_file_is_a_404(
    alice: Person, charlie: Person, chat_file: str, django_capture_on_commit_callbacks: Any
) -> None:
    error = refused(
        charlie, django_capture_on_commit_callbacks, 404, model=TINY_LLAMA, training_file=chat_file
    )
    assert error["param"] == "training_file"


def test_a_file_for_another_purpose_or_format_is_refused_with_the_reason(
    alice: Person, chat_file: str, django_capture_on_commit_callbacks: Any
) -> None:
    error = refused(
        alice,
        django_capture_on_commit_callbacks,
        400,
        model=TINY_LLAMA,
        training_file=chat_file,
        method={"type": "dpo"},
    )
    assert error["code"] == "invalid_training_file"
    assert "preference" in error["message"]
    error = refused(
        alice,
        django_capture_on_commit_callbacks,
        400,
        model=TINY_LLAMA,
        training_file=chat_file,
        task="classification",
    )
    assert "classification" in error["message"]


def test_a_file_still_being_validated_is_refused(
    alice: Person, django_capture_on_commit_callbacks: Any
) -> None:
    import io

    register_tiny_llama()
    f = io.BytesIO(chat_rows(3))
    f.name = "t.jsonl"
    with django_capture_on_commit_callbacks(execute=False):  # validation not run yet
        file_id = alice.client.post(
            "/v1/files", {"file": f, "purpose": "fine-tune"}, format="multipart"
        ).json()["id"]
    error = refused(
        alice, django_capture_on_commit_callbacks, 400, model=TINY_LLAMA, training_file=file_id
    )
    assert error["code"] == "invalid_file_status"
    assert "processed" in error["message"]


def test_malformed_json_and_non_object_bodies_are_400(alice: Person) -> None:
    response = alice.client.post(
        "/v1/fine_tuning/jobs", b"{not json", content_type="application/json"
    )
    assert response.status_code == 400
    response = alice.client.post("/v1/fine_tuning/jobs", [1, 2], format="json")
    assert response.status_code == 400


def test_oversized_bodies_are_413(alice: Person, chat_file: str) -> None:
    from controlplane.core.errors import error_body  # noqa: F401 - shape is asserted below

    response = alice.client.post(
        "/v1/fine_tuning/jobs",
        {"model": TINY_LLAMA, "training_file": chat_file, "suffix": "x" * 3_000_000},
        format="json",
    )
    assert response.status_code in (400, 413)
    assert "error" in response.json()


def test_unauthenticated_and_read_only_callers_are_refused(alice: Person, chat_file: str) -> None:
    assert client_with(None).get("/v1/fine_tuning/jobs").status_code == 401
    viewer = join(alice.organization, "vic@acme.test", "viewer")
    response = viewer.client.post(
        "/v1/fine_tuning/jobs", {"model": TINY_LLAMA, "training_file": chat_file}, format="json"
    )
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "missing_scope"
    assert viewer.client.get("/v1/fine_tuning/jobs").status_code == 200


def test_an_unknown_job_id_is_404(alice: Person) -> None:
    for suffix in ("", "/events", "/checkpoints"):
        assert alice.client.get(f"/v1/fine_tuning/jobs/ftjob-nope{suffix}").status_code == 404
    assert alice.client.post("/v1/fine_tuning/jobs/ftjob-nope/cancel").status_code == 404
