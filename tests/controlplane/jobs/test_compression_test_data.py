"""Held-out test data on compression jobs: `test_file` (any method) or
`options.test_fraction` (prune and distill with training data) reach the worker's spec,
bad input is refused naming the param, and the test metrics the worker measures for the
result and its source are on the job, its report and the compressed model's card."""

from __future__ import annotations

import json
from typing import Any

import pytest

from controlplane.jobs.models import Job
from controlplane.modelregistry.models import BaseModel
from jobcontracts import training as contract
from tests.support.jobs import (
    TINY_LLAMA,
    Worker,
    chat_rows,
    purge_broker,
    register_tiny_llama,
    sent_compression_specs,
    upload_file,
)
from tests.support.people import Person

pytestmark = pytest.mark.django_db

PROMPTS = b"".join(
    json.dumps({"prompt": f"q {i}", "completion": " yes"}).encode() + b"\n" for i in range(6)
)
PREFERENCE = b"".join(
    json.dumps({"prompt": f"q {i}", "chosen": " yes", "rejected": " no"}).encode() + b"\n"
    for i in range(6)
)
PRUNE = {"sparsity": 0.3, "recovery_steps": 5}
RESULT = {"test_loss": 2.5, "test_perplexity": 12.1825}
SOURCE = {"test_loss": 2.25, "test_perplexity": 9.4877}
REPORT = {
    "method": "prune",
    "device": "cpu",
    "quality_metric": "perplexity",
    "source": {"parameters": 100, "file_bytes": 400, "quality": 9.0, **SOURCE},
    "result": {"parameters": 70, "file_bytes": 280, "quality": 11.0, **RESULT},
    "test_data": "test_file",
    "test_rows": 6,
}


@pytest.fixture
def base(db: None) -> BaseModel:
    purge_broker()
    model: BaseModel = register_tiny_llama()
    return model


@pytest.fixture
def chat_file(alice: Person, base: BaseModel, django_capture_on_commit_callbacks: Any) -> str:
    return upload_file(alice, chat_rows(30), django_capture_on_commit_callbacks)


@pytest.fixture
def test_file(alice: Person, base: BaseModel, django_capture_on_commit_callbacks: Any) -> str:
    return upload_file(alice, chat_rows(6), django_capture_on_commit_callbacks, name="test.jsonl")


def create(person: Person, captured: Any, **body: Any) -> Any:
    with captured(execute=True):
        return person.client.post("/v1/compression/jobs", body, format="json")


def created(person: Person, captured: Any, **body: Any) -> dict[str, Any]:
    response = create(person, captured, **body)
    assert response.status_code == 200, response.content
    return response.json()  # type: ignore[no-any-return]


def job_of(person: Person, job_id: str) -> dict[str, Any]:
    response = person.client.get(f"/v1/compression/jobs/{job_id}")
    assert response.status_code == 200, response.content
    return response.json()  # type: ignore[no-any-return]


def refused(person: Person, captured: Any, status: int, **body: Any) -> dict[str, Any]:
    purge_broker()
    response = create(person, captured, **body)
    assert response.status_code == status, response.content
    assert not Job.objects.dangerously_unscoped().filter(kind="compression").exists()
    assert sent_compression_specs() == []
    return response.json()["error"]  # type: ignore[no-any-return]


def test_a_test_file_reaches_the_worker_and_both_models_test_metrics_are_shown(
    alice: Person, chat_file: str, test_file: str, django_capture_on_commit_callbacks: Any
) -> None:
    captured = django_capture_on_commit_callbacks
    job = created(
        alice,
        captured,
        model=TINY_LLAMA,
        method="prune",
        options=PRUNE,
        training_file=chat_file,
        test_file=test_file,
    )
    assert job["test_file"] == test_file
    assert job["test_metrics"] is None
    (spec,) = sent_compression_specs()
    assert spec.test_data is not None
    assert spec.test_data.format == "chat"
    stored = Job.objects.dangerously_unscoped().get(pk=job["id"]).test_file
    assert stored is not None
    assert spec.test_data.uri.endswith(stored.storage_name)
    assert spec.test_fraction == 0.0

    worker = Worker(job["id"], 1)
    worker.report(contract.STARTED, device="cpu", method="prune", total_steps=5)
    worker.report(
        contract.SUCCEEDED,
        artifact_uri=worker.uri("final"),
        artifact_kind="full",
        trained_tokens=100,
        report=REPORT,
        test_metrics={**RESULT, "test_rows": 6, "not_a_test_metric": 1},
    )

    done = job_of(alice, job["id"])
    assert done["status"] == "succeeded"
    assert done["test_metrics"] == {**RESULT, "test_rows": 6}
    assert done["source_test_metrics"] == SOURCE
    report = alice.client.get(f"/v1/compression/jobs/{job['id']}/report").json()
    assert report["source"]["test_loss"] == SOURCE["test_loss"]
    assert report["test_rows"] == 6

    card = alice.client.get(f"/v1/models/{done['compressed_model']}/card").json()
    assert card["metrics"]["test"] == {**RESULT, "test_rows": 6}
    roles = {f["role"]: f["id"] for f in card["training_data"]["files"]}
    assert roles == {"training": chat_file, "test": test_file}
    markdown = alice.client.get(
        f"/v1/models/{done['compressed_model']}/card", HTTP_ACCEPT="text/markdown"
    ).content.decode()
    assert "| test_loss | 2.25 | 2.5 |" in markdown  # source | result


def test_test_fraction_is_sent_to_the_worker_apart_from_the_methods_options(
    alice: Person, chat_file: str, django_capture_on_commit_callbacks: Any
) -> None:
    job = created(
        alice,
        django_capture_on_commit_callbacks,
        model=TINY_LLAMA,
        method="distill",
        options={"student_layers": 1, "steps": 10, "test_fraction": 0.2},
        training_file=chat_file,
        seed=7,
    )
    assert job["options"]["test_fraction"] == 0.2
    assert job["test_file"] is None
    (spec,) = sent_compression_specs()
    assert spec.test_fraction == 0.2
    assert spec.test_data is None
    assert spec.seed == 7  # the split is `held_out_rows(rows, 0.2, 7)`, on every attempt
    assert "test_fraction" not in spec.options


def test_a_quantize_job_takes_a_test_file_in_its_validation_files_format(
    alice: Person, base: BaseModel, test_file: str, django_capture_on_commit_callbacks: Any
) -> None:
    job = created(
        alice,
        django_capture_on_commit_callbacks,
        model=TINY_LLAMA,
        method="quantize",
        validation_file=test_file,
        test_file=test_file,
    )
    (spec,) = sent_compression_specs()
    assert spec.test_data is not None
    assert job["test_file"] == test_file


def test_a_test_file_in_another_format_than_the_validation_file_is_refused(
    alice: Person, base: BaseModel, test_file: str, django_capture_on_commit_callbacks: Any
) -> None:
    captured = django_capture_on_commit_callbacks
    prompts = upload_file(alice, PROMPTS, captured, name="p.jsonl")
    error = refused(
        alice,
        captured,
        400,
        model=TINY_LLAMA,
        method="quantize",
        validation_file=test_file,
        test_file=prompts,
    )
    assert (error["param"], error["code"]) == ("test_file", "invalid_test_file")
    assert "'chat'" in error["message"]
    assert "'prompt_completion'" in error["message"]


def test_a_retry_keeps_the_test_file_and_the_test_fraction(
    alice: Person, chat_file: str, test_file: str, django_capture_on_commit_callbacks: Any
) -> None:
    from controlplane.jobs.services import job_retry

    captured = django_capture_on_commit_callbacks
    bodies: list[dict[str, Any]] = [
        {"test_file": test_file, "options": PRUNE},
        {"options": {**PRUNE, "test_fraction": 0.1}},
    ]
    for body in bodies:
        job_id = created(
            alice, captured, model=TINY_LLAMA, method="prune", training_file=chat_file, **body
        )["id"]
        alice.client.post(f"/v1/compression/jobs/{job_id}/cancel")
        with captured(execute=True):
            retry = job_retry(job=Job.objects.dangerously_unscoped().get(pk=job_id))
        assert retry.test_file_id == body.get("test_file")
        assert retry.hyperparameters.get("test_fraction") == body["options"].get("test_fraction")


# --- bad input ----------------------------------------------------------------------------


def test_a_foreign_or_unknown_test_file_is_a_404(
    alice: Person,
    charlie: Person,
    test_file: str,
    django_capture_on_commit_callbacks: Any,
) -> None:
    for file_id in (test_file, "file-nope"):
        error = refused(
            charlie,
            django_capture_on_commit_callbacks,
            404,
            model=TINY_LLAMA,
            method="quantize",
            test_file=file_id,
        )
        assert error["param"] == "test_file"
        assert file_id in error["message"]


def test_an_empty_test_file_is_refused(
    alice: Person, chat_file: str, django_capture_on_commit_callbacks: Any
) -> None:
    from controlplane.datasets.models import File

    captured = django_capture_on_commit_callbacks
    empty = upload_file(alice, chat_rows(2), captured, name="e.jsonl")
    # A processed file whose rows all went (the validator keeps none of a blank file).
    File.objects.for_organization(alice.organization).filter(pk=empty).update(
        validation={"format": "chat", "rows": 0}
    )
    error = refused(
        alice,
        captured,
        400,
        model=TINY_LLAMA,
        method="prune",
        options=PRUNE,
        training_file=chat_file,
        test_file=empty,
    )
    assert (error["param"], error["code"]) == ("test_file", "empty_file")


def test_a_test_file_in_another_format_than_the_training_data_is_refused(
    alice: Person, chat_file: str, django_capture_on_commit_callbacks: Any
) -> None:
    captured = django_capture_on_commit_callbacks
    for content in (PROMPTS, PREFERENCE):
        other = upload_file(alice, content, captured, name="o.jsonl")
        error = refused(
            alice,
            captured,
            400,
            model=TINY_LLAMA,
            method="prune",
            options=PRUNE,
            training_file=chat_file,
            test_file=other,
        )
        assert (error["param"], error["code"]) == ("test_file", "invalid_test_file")
        assert "'chat'" in error["message"]


def test_a_test_file_no_model_of_the_task_is_tested_on_is_refused(
    alice: Person, base: BaseModel, django_capture_on_commit_callbacks: Any
) -> None:
    captured = django_capture_on_commit_callbacks
    preference = upload_file(alice, PREFERENCE, captured, name="p.jsonl")
    error = refused(alice, captured, 400, model=TINY_LLAMA, method="quantize", test_file=preference)
    assert (error["param"], error["code"]) == ("test_file", "invalid_test_file")
    assert "preference" in error["message"]


@pytest.mark.parametrize("fraction", [0, -0.1, 0.51, 1, "half"])
def test_test_fraction_outside_0_to_half_is_refused_naming_it(
    alice: Person, chat_file: str, django_capture_on_commit_callbacks: Any, fraction: Any
) -> None:
    error = refused(
        alice,
        django_capture_on_commit_callbacks,
        400,
        model=TINY_LLAMA,
        method="prune",
        options={**PRUNE, "test_fraction": fraction},
        training_file=chat_file,
    )
    assert error["param"] == "options.test_fraction"
    assert "Unknown field" not in error["message"]


def test_a_test_file_and_a_test_fraction_together_are_refused(
    alice: Person, chat_file: str, test_file: str, django_capture_on_commit_callbacks: Any
) -> None:
    error = refused(
        alice,
        django_capture_on_commit_callbacks,
        400,
        model=TINY_LLAMA,
        method="prune",
        options={**PRUNE, "test_fraction": 0.1},
        training_file=chat_file,
        test_file=test_file,
    )
    assert (error["param"], error["code"]) == ("test_file", "invalid_test_file")
    assert "not both" in error["message"]


def test_a_test_fraction_needs_training_rows_to_hold_out(
    alice: Person, base: BaseModel, django_capture_on_commit_callbacks: Any
) -> None:
    captured = django_capture_on_commit_callbacks
    quantize = refused(
        alice, captured, 400, model=TINY_LLAMA, method="quantize", options={"test_fraction": 0.2}
    )
    assert quantize["param"] == "options.test_fraction"
    assert "test_file" in quantize["message"]
    distill = refused(
        alice, captured, 400, model=TINY_LLAMA, method="distill", options={"test_fraction": 0.2}
    )
    assert (distill["param"], distill["code"]) == (
        "options.test_fraction",
        "missing_training_file",
    )
    one_row = upload_file(alice, chat_rows(1), captured, name="one.jsonl")
    too_few = refused(
        alice,
        captured,
        400,
        model=TINY_LLAMA,
        method="prune",
        options={**PRUNE, "test_fraction": 0.5},
        training_file=one_row,
    )
    assert (too_few["param"], too_few["code"]) == ("options.test_fraction", "invalid_test_fraction")


def test_the_schema_documents_test_file_and_test_fraction(alice: Person) -> None:
    schema = alice.client.get("/v1/schema", HTTP_ACCEPT="application/vnd.oai.openapi+json")
    assert schema.status_code == 200
    components = json.loads(schema.content)["components"]["schemas"]
    create_input = components["CreateCompressionJobInputRequest"]["properties"]
    assert "held out" in create_input["test_file"]["description"]
    assert "test_fraction" in create_input["options"]["description"]
    assert "(0, 0.5]" in create_input["options"]["description"]
