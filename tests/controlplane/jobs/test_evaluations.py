"""`/v1/evaluations`: score models the caller may use on one of their files, on the GPU
workers, with the jobs' lifecycle, cancel, errors, cross-tenant 404 and billing."""

from __future__ import annotations

import json
from typing import Any

import pytest
from django.core.files.base import ContentFile
from django.core.files.storage import default_storage

from controlplane.billing.models import LedgerEntry, Meter
from controlplane.jobs.dispatch import job_prefix
from controlplane.jobs.models import Job
from controlplane.jobs.reports import report_apply
from gpuworkers.evaluation.task import handle
from jobcontracts import training as contract
from tests.gpuworkers.helpers import CLASSIFICATION_ROWS, Reports
from tests.support.jobs import (
    TINY_LLAMA,
    Worker,
    chat_rows,
    register_tiny_llama,
    sent_evaluation_specs,
    sent_specs,
    upload_file,
)
from tests.support.people import Person
from tests.support.registry import customer_model

pytestmark = pytest.mark.django_db


@pytest.fixture
def chat_file(alice: Person, django_capture_on_commit_callbacks: Any) -> str:
    register_tiny_llama()
    return upload_file(alice, chat_rows(5), django_capture_on_commit_callbacks)


def create(person: Person, captured: Any, **body: Any) -> Any:
    with captured(execute=True):
        return person.client.post("/v1/evaluations", body, format="json")


def evaluation_of(person: Person, job_id: str) -> dict[str, Any]:
    response = person.client.get(f"/v1/evaluations/{job_id}")
    assert response.status_code == 200, response.content
    return response.json()  # type: ignore[no-any-return]


def refused(person: Person, captured: Any, status: int, **body: Any) -> dict[str, Any]:
    response = create(person, captured, **body)
    assert response.status_code == status, response.content
    assert not Job.objects.for_organization(person.organization).exists()
    return response.json()["error"]  # type: ignore[no-any-return]


def test_a_base_model_is_scored_on_a_worker_with_per_row_results_and_billed_tokens(
    alice: Person, chat_file: str, django_capture_on_commit_callbacks: Any
) -> None:
    response = create(alice, django_capture_on_commit_callbacks, model=TINY_LLAMA, file=chat_file)
    assert response.status_code == 200, response.content
    created = response.json()
    assert created["object"] == "evaluation"
    assert created["id"].startswith("evaljob-")
    assert created["status"] == "queued"
    assert sent_specs() == []  # not a training attempt
    (spec,) = sent_evaluation_specs()
    assert spec.job_id == created["id"]
    assert [m.name for m in spec.models] == [TINY_LLAMA]
    assert spec.data.format == "chat"

    # The real worker code runs the attempt; its reports are applied as the control
    # plane's report task applies them.
    reports = Reports()
    with django_capture_on_commit_callbacks(execute=True):
        outcome = handle(spec.to_json(), reports)
        assert outcome["status"] == "succeeded", reports.of("failed")
        assert {report_apply(r.to_json()) for r in reports.items} <= {"applied", "heartbeat"}

    done = evaluation_of(alice, created["id"])
    assert done["status"] == "succeeded"
    assert done["rows"] == 5
    metrics = done["metrics"][TINY_LLAMA]
    assert metrics["loss"] > 0
    assert done["table"] == [{"model": TINY_LLAMA, **metrics}]
    content = alice.client.get(f"/v1/files/{done['output_file_id']}/content")
    assert content.status_code == 200
    lines = [json.loads(line) for line in b"".join(content.streaming_content).splitlines()]
    assert [line["row"] for line in lines] == list(range(5))
    per_row = [line["results"][TINY_LLAMA]["loss"] for line in lines]
    tokens = [line["results"][TINY_LLAMA]["tokens"] for line in lines]
    mean = sum(loss * n for loss, n in zip(per_row, tokens, strict=True)) / sum(tokens)
    assert metrics["loss"] == pytest.approx(mean)

    (entry,) = LedgerEntry.objects.for_organization(alice.organization).filter(
        reference=created["id"]
    )
    assert entry.meter == Meter.PROMPT_TOKENS
    assert entry.model == TINY_LLAMA
    assert entry.quantity == done["usage"]["prompt_tokens"] > 0
    # A redelivered success report bills and makes nothing more.
    assert report_apply(reports.of("succeeded")[0].to_json()) == "duplicate"
    assert LedgerEntry.objects.for_organization(alice.organization).count() == 1

    events = alice.client.get(f"/v1/evaluations/{created['id']}/events").json()["data"]
    assert {e["object"] for e in events} == {"evaluation.event"}
    assert any(e["message"] == "The evaluation has completed" for e in events)


def test_several_models_give_a_side_by_side_table_in_the_order_asked(
    alice: Person, chat_file: str, django_capture_on_commit_callbacks: Any
) -> None:
    tuned = customer_model(alice, base=register_tiny_llama(), suffix="support")
    response = create(
        alice,
        django_capture_on_commit_callbacks,
        models=[tuned.pk, TINY_LLAMA],
        file=chat_file,
    )
    assert response.status_code == 200, response.content
    job_id = response.json()["id"]
    (spec,) = sent_evaluation_specs()
    lora, base = spec.models
    assert (lora.name, lora.adapter_uri, lora.uri) == (tuned.pk, tuned.uri, base.uri)
    assert base.adapter_uri is None

    worker = Worker(job_id, 1)
    worker.report(contract.STARTED, device="cpu", models=[tuned.pk, TINY_LLAMA], rows=5)
    job = Job.objects.dangerously_unscoped().get(pk=job_id)
    default_storage.save(f"{job_prefix(job)}/results.jsonl", ContentFile(b'{"row": 0}\n'))
    worker.report(
        contract.SUCCEEDED,
        artifact_uri=worker.uri("results.jsonl"),
        rows=5,
        metrics={tuned.pk: {"loss": 1.0}, TINY_LLAMA: {"loss": 2.0}},
        tokens={tuned.pk: 50, TINY_LLAMA: 50},
    )
    done = evaluation_of(alice, job_id)
    assert done["table"] == [{"model": tuned.pk, "loss": 1.0}, {"model": TINY_LLAMA, "loss": 2.0}]
    billed = LedgerEntry.objects.for_organization(alice.organization).filter(reference=job_id)
    assert sorted(billed.values_list("model", "quantity")) == sorted(
        [(tuned.pk, 50), (TINY_LLAMA, 50)]
    )


def test_an_evaluation_is_cancelled_once_and_is_not_a_fine_tuning_job(
    alice: Person, chat_file: str, django_capture_on_commit_callbacks: Any
) -> None:
    job_id = create(
        alice, django_capture_on_commit_callbacks, model=TINY_LLAMA, file=chat_file
    ).json()["id"]
    with django_capture_on_commit_callbacks(execute=True):
        cancelled = alice.client.post(f"/v1/evaluations/{job_id}/cancel")
    assert cancelled.status_code == 200
    assert cancelled.json()["status"] == "cancelled"
    again = alice.client.post(f"/v1/evaluations/{job_id}/cancel")
    assert again.status_code == 409
    assert alice.client.get(f"/v1/fine_tuning/jobs/{job_id}").status_code == 404
    listed = alice.client.get("/v1/evaluations").json()["data"]
    assert [e["id"] for e in listed] == [job_id]
    assert alice.client.get("/v1/fine_tuning/jobs").json()["data"] == []


def test_a_foreign_file_or_model_is_a_404_naming_it(
    alice: Person, charlie: Person, chat_file: str, django_capture_on_commit_callbacks: Any
) -> None:
    error = refused(
        charlie, django_capture_on_commit_callbacks, 404, model=TINY_LLAMA, file=chat_file
    )
    assert error["param"] == "file"
    theirs = upload_file(charlie, chat_rows(3), django_capture_on_commit_callbacks)
    tuned = customer_model(alice, base=register_tiny_llama())
    error = refused(charlie, django_capture_on_commit_callbacks, 404, model=tuned.pk, file=theirs)
    assert error["param"] == "models"
    assert error["code"] == "model_not_found"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({}, "models"),  # neither model nor models
        ({"model": TINY_LLAMA, "models": [TINY_LLAMA]}, "models"),
        ({"models": []}, "models"),
        ({"models": [TINY_LLAMA, TINY_LLAMA]}, "models"),
        ({"model": TINY_LLAMA, "batch_size": 0}, "batch_size"),
        ({"model": TINY_LLAMA, "surprise": 1}, "surprise"),
    ],
)
def test_bad_requests_are_refused_naming_the_field(
    alice: Person,
    chat_file: str,
    django_capture_on_commit_callbacks: Any,
    body: dict[str, Any],
    param: str,
) -> None:
    error = refused(alice, django_capture_on_commit_callbacks, 400, file=chat_file, **body)
    assert error["param"] == param


def test_a_classification_file_needs_a_classifier(
    alice: Person, django_capture_on_commit_callbacks: Any
) -> None:
    register_tiny_llama()
    rows = b"".join(json.dumps(row).encode() + b"\n" for row in CLASSIFICATION_ROWS)
    labelled = upload_file(alice, rows, django_capture_on_commit_callbacks)
    error = refused(alice, django_capture_on_commit_callbacks, 400, model=TINY_LLAMA, file=labelled)
    assert error["param"] == "models"
    assert "classification" in error["message"]


def test_the_schema_documents_the_evaluations_endpoints(alice: Person) -> None:
    schema = alice.client.get("/v1/schema", HTTP_ACCEPT="application/vnd.oai.openapi+json")
    paths = json.loads(schema.content)["paths"]
    assert "post" in paths["/v1/evaluations"]
    assert "post" in paths["/v1/evaluations/{job_id}/cancel"]
