"""Held-out test data on fine-tuning jobs: `test_file` or `hyperparameters.test_fraction`
reach the GPU worker's spec, bad input is refused naming the param, and the test metrics the
worker reports at the end are shown on the job next to the validation metrics."""

from __future__ import annotations

import json
from typing import Any

import pytest

from controlplane.jobs.models import Job
from jobcontracts import training as contract
from tests.support.jobs import (
    TINY_LLAMA,
    Worker,
    chat_rows,
    create_job,
    register_tiny_llama,
    sent_specs,
    upload_file,
)
from tests.support.people import Person

pytestmark = pytest.mark.django_db

PREFERENCE = b"".join(
    json.dumps({"prompt": f"q {i}", "chosen": " yes", "rejected": " no"}).encode() + b"\n"
    for i in range(10)
)


@pytest.fixture
def chat_file(alice: Person, django_capture_on_commit_callbacks: Any) -> str:
    register_tiny_llama()
    return upload_file(alice, chat_rows(40), django_capture_on_commit_callbacks)


@pytest.fixture
def held_out_file(alice: Person, chat_file: str, django_capture_on_commit_callbacks: Any) -> str:
    return upload_file(alice, chat_rows(6), django_capture_on_commit_callbacks, name="test.jsonl")


def job_of(person: Person, job_id: str) -> dict[str, Any]:
    response = person.client.get(f"/v1/fine_tuning/jobs/{job_id}")
    assert response.status_code == 200, response.content
    return response.json()  # type: ignore[no-any-return]


def refused(person: Person, captured: Any, status: int, **body: Any) -> dict[str, Any]:
    response = create_job(person, captured, model=TINY_LLAMA, **body)
    assert response.status_code == status, response.content
    assert not Job.objects.for_organization(person.organization).exists()
    return response.json()["error"]  # type: ignore[no-any-return]


def test_a_test_file_reaches_the_worker_and_its_metrics_are_shown_on_the_job(
    alice: Person, chat_file: str, held_out_file: str, django_capture_on_commit_callbacks: Any
) -> None:
    response = create_job(
        alice,
        django_capture_on_commit_callbacks,
        model=TINY_LLAMA,
        training_file=chat_file,
        validation_file=held_out_file,
        test_file=held_out_file,
    )
    assert response.status_code == 200, response.content
    job_id = response.json()["id"]
    assert response.json()["test_file"] == held_out_file
    (spec,) = sent_specs()
    assert spec.test_data is not None
    assert spec.test_data.format == "chat"
    stored = Job.objects.dangerously_unscoped().get(pk=job_id).test_file
    assert stored is not None
    assert spec.test_data.uri.endswith(stored.storage_name)
    assert spec.test_fraction == 0.0

    worker = Worker(job_id, 1)
    worker.report(contract.STARTED, total_steps=2, resumed_from_step=0, device="cpu")
    test = {"test_loss": 1.25, "test_perplexity": 3.49, "test_mean_token_accuracy": 0.5}
    worker.report(contract.METRICS, step=2, **test, test_rows=6)
    worker.report(
        contract.SUCCEEDED,
        step=2,
        trained_tokens=100,
        artifact_uri=worker.uri("final"),
        artifact_kind="lora",
        metrics={"train_loss": 1.0, "valid_loss": 1.5, "valid_perplexity": 4.48},
        test_metrics={**test, "test_rows": 6},
    )

    job = job_of(alice, job_id)
    assert job["status"] == "succeeded"
    assert job["test_metrics"] == {**test, "test_rows": 6}
    assert job["validation_metrics"] == {"valid_loss": 1.5, "valid_perplexity": 4.48}
    events = alice.client.get(f"/v1/fine_tuning/jobs/{job_id}/events").json()["data"]
    assert any(e["message"].startswith("Held-out test set: test_loss=1.2500") for e in events)


def test_test_fraction_is_sent_to_the_worker_and_only_the_rest_is_priced(
    alice: Person, chat_file: str, django_capture_on_commit_callbacks: Any
) -> None:
    held = create_job(
        alice,
        django_capture_on_commit_callbacks,
        model=TINY_LLAMA,
        training_file=chat_file,
        seed=5,
        method={"type": "supervised", "supervised": {"hyperparameters": {"test_fraction": 0.25}}},
    )
    assert held.status_code == 200, held.content
    job = job_of(alice, held.json()["id"])
    assert job["hyperparameters"]["test_fraction"] == 0.25
    assert job["test_file"] is None
    spec = next(s for s in sent_specs() if s.job_id == job["id"])
    assert spec.test_fraction == 0.25
    assert spec.hyperparameters.seed == 5
    plain = create_job(
        alice, django_capture_on_commit_callbacks, model=TINY_LLAMA, training_file=chat_file
    )
    assert contract.held_out_count(40, 0.25) == 10
    # 30 of the 40 rows are trained on: the estimate counts 30/40 of the tokens, pro rata.
    full = job_of(alice, plain.json()["id"])["estimate"]["training_tokens_per_epoch"]
    assert job["estimate"]["training_tokens_per_epoch"] == round(full * 30 / 40)


def test_a_retry_keeps_the_test_file(
    alice: Person, chat_file: str, held_out_file: str, django_capture_on_commit_callbacks: Any
) -> None:
    job_id = create_job(
        alice,
        django_capture_on_commit_callbacks,
        model=TINY_LLAMA,
        training_file=chat_file,
        test_file=held_out_file,
    ).json()["id"]
    alice.client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel")
    retry = Job.objects.dangerously_unscoped().get(pk=job_id)
    from controlplane.jobs.services import job_retry

    with django_capture_on_commit_callbacks(execute=True):
        new = job_retry(job=retry)
    assert new.test_file_id == held_out_file


@pytest.mark.parametrize("fraction", [0, -0.1, 0.51, 1, "half"])
def test_test_fraction_outside_0_to_half_is_refused_naming_it(
    alice: Person, chat_file: str, django_capture_on_commit_callbacks: Any, fraction: Any
) -> None:
    error = refused(
        alice,
        django_capture_on_commit_callbacks,
        400,
        training_file=chat_file,
        method={
            "type": "supervised",
            "supervised": {"hyperparameters": {"test_fraction": fraction}},
        },
    )
    assert error["param"] == "method.supervised.hyperparameters.test_fraction"


def test_test_fraction_of_a_one_row_file_is_refused(
    alice: Person, django_capture_on_commit_callbacks: Any
) -> None:
    register_tiny_llama()
    one = upload_file(alice, chat_rows(1), django_capture_on_commit_callbacks)
    error = refused(
        alice,
        django_capture_on_commit_callbacks,
        400,
        training_file=one,
        hyperparameters={"test_fraction": 0.5},
    )
    assert error["param"] == "hyperparameters.test_fraction"
    assert error["code"] == "invalid_test_fraction"


def test_a_test_file_and_a_test_fraction_together_are_refused(
    alice: Person, chat_file: str, held_out_file: str, django_capture_on_commit_callbacks: Any
) -> None:
    error = refused(
        alice,
        django_capture_on_commit_callbacks,
        400,
        training_file=chat_file,
        test_file=held_out_file,
        hyperparameters={"test_fraction": 0.1},
    )
    assert error["param"] == "test_file"


def test_a_test_file_in_another_format_is_refused(
    alice: Person, chat_file: str, django_capture_on_commit_callbacks: Any
) -> None:
    other = upload_file(alice, PREFERENCE, django_capture_on_commit_callbacks, name="p.jsonl")
    error = refused(
        alice, django_capture_on_commit_callbacks, 400, training_file=chat_file, test_file=other
    )
    assert error["param"] == "test_file"
    assert error["code"] == "invalid_test_file"
    assert "'chat'" in error["message"]
    assert "'preference'" in error["message"]


def test_an_empty_test_file_is_refused(
    alice: Person, chat_file: str, django_capture_on_commit_callbacks: Any
) -> None:
    empty = upload_file(alice, b"\n\n", django_capture_on_commit_callbacks, name="e.jsonl")
    error = refused(
        alice, django_capture_on_commit_callbacks, 400, training_file=chat_file, test_file=empty
    )
    assert error["param"] == "test_file"


def test_a_foreign_or_unknown_test_file_is_a_404(
    alice: Person,
    charlie: Person,
    chat_file: str,
    held_out_file: str,
    django_capture_on_commit_callbacks: Any,
) -> None:
    own = upload_file(charlie, chat_rows(20), django_capture_on_commit_callbacks)
    for file_id in (held_out_file, "file-nope"):
        error = refused(
            charlie, django_capture_on_commit_callbacks, 404, training_file=own, test_file=file_id
        )
        assert error["param"] == "test_file"
        assert file_id in error["message"]


def test_the_schema_documents_test_file_and_test_fraction(alice: Person) -> None:
    schema = alice.client.get("/v1/schema", HTTP_ACCEPT="application/vnd.oai.openapi+json")
    assert schema.status_code == 200
    components = json.loads(schema.content)["components"]["schemas"]
    create = components["CreateJobInputRequest"]["properties"]
    assert "held out" in create["test_file"]["description"]
    hyper = components["SupervisedHyperparametersRequest"]["properties"]["test_fraction"]
    assert "(0, 0.5]" in hyper["description"]
