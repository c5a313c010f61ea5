"""Compression jobs through `/v1/compression/jobs`: checks, estimate, dispatch, reports,
the compressed model (listed, deployed, billed once), cancel and lost attempts.

The worker's side is played by `Worker` (reports applied as the control queue applies
them); tests/gpuworkers/test_compression_*.py run the real methods, and
test_compression_real_workers.py a real GPU worker process.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest

from controlplane.billing.models import LedgerEntry, Meter
from controlplane.inference.models import Deployment
from controlplane.jobs import dispatch
from controlplane.jobs.models import Job
from controlplane.modelregistry.models import BaseModel, CustomerModel
from jobcontracts import training as contract
from tests.support.cross_tenant import make_version
from tests.support.jobs import (
    TINY_LLAMA,
    Worker,
    chat_rows,
    create_job,
    purge_broker,
    register_tiny_llama,
    sent_compression_specs,
    sent_specs,
    upload_file,
)
from tests.support.models import minilm_dir
from tests.support.people import Person
from tests.support.registry import base_model, customer_model

from .test_jobs import expire_lease

pytestmark = pytest.mark.django_db

MINILM = "all-MiniLM-L6-v2"
REPORT = {
    "method": "quantize",
    "device": "cpu",
    "quality_metric": "perplexity",
    "source": {"parameters": 100, "file_bytes": 400, "quality": 9.0},
    "result": {"parameters": 100, "file_bytes": 130, "quality": 9.1},
}


@pytest.fixture
def base(db: None) -> BaseModel:
    purge_broker()
    model: BaseModel = register_tiny_llama()
    return model


@pytest.fixture
def minilm(db: None) -> BaseModel:
    model, _ = BaseModel.objects.update_or_create(
        id=MINILM,
        defaults={
            "family": "bert",
            "tasks": ["embeddings"],
            "methods": [],
            "adapters": [],
            "context_length": 512,
            "uri": minilm_dir().as_uri(),
            "price_per_1k_training_tokens": Decimal("0.001"),
        },
    )
    return model


@pytest.fixture
def chat_file(alice: Person, base: BaseModel, django_capture_on_commit_callbacks: Any) -> str:
    return upload_file(alice, chat_rows(30), django_capture_on_commit_callbacks)


def create(person: Person, captured: Any, **body: Any) -> Any:
    with captured(execute=True):
        return person.client.post("/v1/compression/jobs", body, format="json")


def job_of(person: Person, job_id: str) -> dict[str, Any]:
    response = person.client.get(f"/v1/compression/jobs/{job_id}")
    assert response.status_code == 200, response.content
    return response.json()  # type: ignore[no-any-return]


def test_a_quantize_job_is_estimated_and_sent_to_a_compression_worker(
    alice: Person, base: BaseModel, django_capture_on_commit_callbacks: Any
) -> None:
    response = create(
        alice, django_capture_on_commit_callbacks, model=TINY_LLAMA, method="quantize", seed=3
    )
    assert response.status_code == 200, response.content
    job = response.json()
    assert job["object"] == "compression.job"
    assert job["id"].startswith("cmpjob-")
    assert job["status"] == "queued"
    assert job["task"] == "causal_lm"
    assert job["options"] == {"weights": "int8"}
    assert job["estimate"]["price"] == "2.000000"  # the seeded per-job price
    assert job["estimate"]["seconds"] >= 30
    assert job_of(alice, job["id"])["attempt"] == 1  # dispatched once it committed

    (spec,) = sent_compression_specs()
    assert sent_specs() == []  # nothing on the training queue
    assert spec.job_id == job["id"]
    assert spec.attempt == 1
    assert spec.method == "quantize"
    assert spec.options == {"weights": "int8"}
    assert spec.source.uri == base.uri
    assert spec.source.adapter_uri is None
    assert spec.output_uri.endswith(f"jobs/{alice.organization.pk}/{job['id']}")
    assert spec.seed == 3
    events = alice.client.get(f"/v1/compression/jobs/{job['id']}/events").json()
    assert events["object"] == "list"
    assert {e["object"] for e in events["data"]} == {"compression.job.event"}
    assert any("Estimated price 2.000000" in e["message"] for e in events["data"])


def test_success_registers_a_served_model_bills_once_and_keeps_the_report(
    alice: Person, base: BaseModel, django_capture_on_commit_callbacks: Any
) -> None:
    job_id = create(
        alice, django_capture_on_commit_callbacks, model=TINY_LLAMA, method="quantize", suffix="s"
    ).json()["id"]
    assert alice.client.get(f"/v1/compression/jobs/{job_id}/report").status_code == 409
    worker = Worker(job_id, 1)
    worker.report(contract.STARTED, device="cpu", method="quantize", total_steps=0)
    assert job_of(alice, job_id)["status"] == "running"
    assert job_of(alice, job_id)["estimated_finish"] is not None
    succeeded = {"artifact_uri": worker.uri("final"), "artifact_kind": "full", "report": REPORT}
    assert worker.report(contract.SUCCEEDED, **succeeded) == "applied"
    # Redelivered by the broker: nothing changes, nothing is billed again.
    again = Worker(job_id, 1)
    again.seq = 1
    assert again.report(contract.SUCCEEDED, **succeeded) == "duplicate"

    job = job_of(alice, job_id)
    assert job["status"] == "succeeded"
    model_id = job["compressed_model"]
    assert model_id == f"ft:{TINY_LLAMA}:{alice.organization.name.lower()}:s:compressed:{job_id}"
    listed = {m["id"]: m for m in alice.client.get("/v1/models").json()["data"]}
    assert listed[model_id]["kind"] == "compressed"
    assert listed[model_id]["compression"] == {
        "method": "quantize",
        "source": TINY_LLAMA,
        "weights": "int8",
    }
    assert listed[model_id]["tasks"] == ["causal_lm"]
    model = CustomerModel.objects.for_organization(alice.organization).get(pk=model_id)
    assert model.uri == worker.uri("final")
    assert model.artifact_kind == "full"
    assert (
        Deployment.objects.for_organization(alice.organization).filter(model_id=model_id).exists()
    )
    entries = LedgerEntry.objects.for_organization(alice.organization).filter(
        meter=Meter.COMPRESSION_JOB
    )
    assert [(e.quantity, e.reference, e.model) for e in entries] == [(1, job_id, TINY_LLAMA)]
    report = alice.client.get(f"/v1/compression/jobs/{job_id}/report").json()
    assert report["object"] == "compression.job.report"
    assert report["model"] == model_id
    assert report["result"]["file_bytes"] == 130


def test_a_job_cancelled_mid_way_ends_cancelled_with_no_model_and_no_charge(
    alice: Person, base: BaseModel, chat_file: str, django_capture_on_commit_callbacks: Any
) -> None:
    job_id = create(
        alice,
        django_capture_on_commit_callbacks,
        model=TINY_LLAMA,
        method="prune",
        options={"sparsity": 0.3, "recovery_steps": 20},
        training_file=chat_file,
    ).json()["id"]
    worker = Worker(job_id, 1)
    worker.report(contract.STARTED, device="cpu", method="prune", total_steps=20)
    worker.report(contract.PROGRESS, step=5, total_steps=20, phase="recovery", train_loss=2.0)
    with django_capture_on_commit_callbacks(execute=True):
        response = alice.client.post(f"/v1/compression/jobs/{job_id}/cancel")
    assert response.status_code == 200, response.content
    assert response.json()["status"] == "cancelled"
    # A report that was already on its way is recorded, not applied.
    late = {"artifact_uri": worker.uri("final"), "report": REPORT}
    worker.report(contract.SUCCEEDED, **late)
    job = job_of(alice, job_id)
    assert job["status"] == "cancelled"
    assert job["compressed_model"] is None
    assert not CustomerModel.objects.for_organization(alice.organization).exists()
    assert not LedgerEntry.objects.for_organization(alice.organization).exists()
    again = alice.client.post(f"/v1/compression/jobs/{job_id}/cancel")
    assert again.status_code == 409
    # Compression has no checkpoints to pause at: no pause endpoint.
    assert alice.client.post(f"/v1/compression/jobs/{job_id}/pause").status_code == 404


def test_a_silent_worker_is_redispatched_from_the_start_and_fenced_and_billed_once(
    alice: Person, base: BaseModel, django_capture_on_commit_callbacks: Any
) -> None:
    job_id = create(
        alice, django_capture_on_commit_callbacks, model=TINY_LLAMA, method="quantize"
    ).json()["id"]
    first = Worker(job_id, 1)
    first.report(contract.STARTED, device="cpu", method="quantize", total_steps=0)
    purge_broker()
    expire_lease(job_id)
    with django_capture_on_commit_callbacks(execute=True):
        assert dispatch.reap()["lost"] == 1
    (spec,) = sent_compression_specs()
    assert spec.attempt == 2
    assert first.report(contract.SUCCEEDED, artifact_uri=first.uri("final")) == "stale"
    second = Worker(job_id, 2)
    second.report(contract.STARTED, device="cpu", method="quantize", total_steps=0)
    second.report(contract.SUCCEEDED, artifact_uri=second.uri("final"), report=REPORT)
    assert job_of(alice, job_id)["status"] == "succeeded"
    assert LedgerEntry.objects.for_organization(alice.organization).count() == 1
    events = alice.client.get(f"/v1/compression/jobs/{job_id}/events?limit=100").json()["data"]
    assert any("retrying from the start" in e["message"] for e in events)


def test_a_report_naming_another_prefix_is_refused(
    alice: Person, base: BaseModel, django_capture_on_commit_callbacks: Any
) -> None:
    job_id = create(
        alice, django_capture_on_commit_callbacks, model=TINY_LLAMA, method="quantize"
    ).json()["id"]
    worker = Worker(job_id, 1)
    foreign = worker.uri("final").replace(alice.organization.pk, "org_other")
    assert worker.report(contract.SUCCEEDED, artifact_uri=foreign) == "refused"
    assert not CustomerModel.objects.for_organization(alice.organization).exists()


def test_a_worker_failure_fails_the_job_with_its_message(
    alice: Person, base: BaseModel, django_capture_on_commit_callbacks: Any
) -> None:
    job_id = create(
        alice,
        django_capture_on_commit_callbacks,
        model=TINY_LLAMA,
        method="quantize",
        options={"weights": "bf16"},
    ).json()["id"]
    Worker(job_id, 1).report(
        contract.FAILED,
        code="unsupported_on_device",
        message="weights 'bf16' needs a CUDA worker; use 'int8'",
        param="weights",
        retryable=False,
    )
    job = job_of(alice, job_id)
    assert job["status"] == "failed"
    assert job["error"]["code"] == "unsupported_on_device"


def test_embedding_models_compress_as_embeddings_and_distill_to_half_the_layers(
    alice: Person, minilm: BaseModel, django_capture_on_commit_callbacks: Any
) -> None:
    purge_broker()
    job = create(alice, django_capture_on_commit_callbacks, model=MINILM, method="distill")
    assert job.status_code == 200, job.content
    assert job.json()["task"] == "embeddings"
    assert job.json()["options"]["student_layers"] == 3  # MiniLM has 6
    (spec,) = sent_compression_specs()
    assert spec.task == "embeddings"
    assert spec.training_data is None


def test_a_lora_fine_tune_is_sent_with_its_adapter_to_merge(
    alice: Person, base: BaseModel, django_capture_on_commit_callbacks: Any
) -> None:
    tuned = customer_model(alice, base=base, suffix="mine")
    response = create(alice, django_capture_on_commit_callbacks, model=tuned.pk, method="quantize")
    assert response.status_code == 200, response.content
    assert response.json()["model"] == tuned.pk
    (spec,) = sent_compression_specs()
    assert spec.source.uri == base.uri
    assert spec.source.adapter_uri == tuned.uri


def test_jobs_of_the_other_kind_are_not_found_on_each_endpoint(
    alice: Person, base: BaseModel, chat_file: str, django_capture_on_commit_callbacks: Any
) -> None:
    compression_id = create(
        alice, django_capture_on_commit_callbacks, model=TINY_LLAMA, method="quantize"
    ).json()["id"]
    tuning_id = create_job(
        alice, django_capture_on_commit_callbacks, model=TINY_LLAMA, training_file=chat_file
    ).json()["id"]
    assert alice.client.get(f"/v1/fine_tuning/jobs/{compression_id}").status_code == 404
    assert alice.client.get(f"/v1/compression/jobs/{tuning_id}").status_code == 404
    assert alice.client.post(f"/v1/compression/jobs/{tuning_id}/cancel").status_code == 404
    assert [j["id"] for j in alice.client.get("/v1/compression/jobs").json()["data"]] == [
        compression_id
    ]
    assert [j["id"] for j in alice.client.get("/v1/fine_tuning/jobs").json()["data"]] == [tuning_id]


def test_the_list_paginates_as_fine_tuning_jobs_do(
    alice: Person, base: BaseModel, django_capture_on_commit_callbacks: Any
) -> None:
    ids = [
        create(
            alice, django_capture_on_commit_callbacks, model=TINY_LLAMA, method="quantize"
        ).json()["id"]
        for _ in range(3)
    ]
    page = alice.client.get("/v1/compression/jobs?limit=2").json()
    assert [j["id"] for j in page["data"]] == ids[::-1][:2]
    assert page["has_more"] is True
    rest = alice.client.get(f"/v1/compression/jobs?limit=2&after={ids[1]}").json()
    assert [j["id"] for j in rest["data"]] == [ids[0]]
    assert rest["has_more"] is False
    bad = alice.client.get("/v1/compression/jobs?limit=0")
    assert bad.status_code == 400


def test_a_viewer_key_reads_but_cannot_create_and_no_key_is_401(
    alice: Person, base: BaseModel, django_capture_on_commit_callbacks: Any
) -> None:
    from rest_framework.test import APIClient

    anonymous = APIClient().post("/v1/compression/jobs", {"model": TINY_LLAMA}, format="json")
    assert anonymous.status_code == 401
    assert APIClient().get("/v1/compression/jobs").status_code == 401
    assert not Job.objects.dangerously_unscoped().exists()


# --- bad input: a clear 4xx naming the field, nothing stored or queued ----------------------


def refused(person: Person, captured: Any, status: int, **body: Any) -> dict[str, Any]:
    purge_broker()
    response = create(person, captured, **body)
    assert response.status_code == status, response.content
    assert not Job.objects.dangerously_unscoped().filter(kind="compression").exists()
    assert sent_compression_specs() == []
    return response.json()["error"]  # type: ignore[no-any-return]


@pytest.mark.parametrize("sparsity", [1.0, 0, -0.1, 1.5, "half"])
def test_sparsity_outside_zero_and_one_is_refused(
    alice: Person, base: BaseModel, django_capture_on_commit_callbacks: Any, sparsity: Any
) -> None:
    error = refused(
        alice,
        django_capture_on_commit_callbacks,
        400,
        model=TINY_LLAMA,
        method="prune",
        options={"sparsity": sparsity, "recovery_steps": 0},
    )
    assert error["param"] == "options.sparsity"


@pytest.mark.parametrize(
    ("body", "status", "param", "words"),
    [
        ({"model": "no-such-model", "method": "quantize"}, 404, "model", "does not exist"),
        ({"model": TINY_LLAMA, "method": "sparsify"}, 400, "method", "quantize"),
        (
            {"model": TINY_LLAMA, "method": "quantize", "options": {"bits": 4}},
            400,
            "options.bits",
            "Unknown field",
        ),
        (
            {"model": TINY_LLAMA, "method": "quantize", "options": {"weights": "int4"}},
            400,
            "options.weights",
            "int8",
        ),
        ({"model": TINY_LLAMA, "method": "prune"}, 400, "options.sparsity", "required"),
        (
            {
                "model": TINY_LLAMA,
                "method": "prune",
                "options": {"sparsity": 0.3, "recovery_steps": 10},
            },
            400,
            "options.recovery_steps",
            "training_file",
        ),
        (
            {"model": TINY_LLAMA, "method": "distill", "options": {"student_layers": 2}},
            400,
            "options.student_layers",
            "fewer layers",
        ),
        (
            {"model": TINY_LLAMA, "method": "distill", "options": {"student_layers": 9}},
            400,
            "options.student_layers",
            "fewer layers",
        ),
        (
            {
                "model": TINY_LLAMA,
                "method": "distill",
                "options": {"student_layers": 1, "student_model": TINY_LLAMA},
            },
            400,
            "options.student_layers",
            "not both",
        ),
        (
            {"model": TINY_LLAMA, "method": "quantize", "surprise": 1},
            400,
            "surprise",
            "Unknown field",
        ),
        (
            {"model": TINY_LLAMA, "method": "quantize", "task": "classification"},
            400,
            "task",
            "classifier you fine-tuned",
        ),
        ({"model": TINY_LLAMA, "method": "quantize", "suffix": "a b"}, 400, "suffix", "letters"),
    ],
)
def test_bad_requests_are_refused_naming_the_field(
    alice: Person,
    base: BaseModel,
    django_capture_on_commit_callbacks: Any,
    body: dict[str, Any],
    status: int,
    param: str,
    words: str,
) -> None:
    error = refused(alice, django_capture_on_commit_callbacks, status, **body)
    assert error["param"] == param, error
    assert words in error["message"], error


def test_an_unsupported_method_and_model_pair_lists_what_is_supported(
    alice: Person, django_capture_on_commit_callbacks: Any
) -> None:
    base_model("odd-mistral", family="mistral", tasks=["causal_lm"])
    error = refused(
        alice,
        django_capture_on_commit_callbacks,
        400,
        model="odd-mistral",
        method="prune",
        options={"sparsity": 0.3, "recovery_steps": 0},
    )
    assert error["param"] == "method"
    assert error["code"] == "unsupported_method"
    assert "quantize for every model" in error["message"]
    assert "bert, gpt2, llama" in error["message"]


@pytest.mark.parametrize("method", ["prune", "distill", "quantize"])
def test_an_already_quantized_model_is_not_compressed_again(
    alice: Person, base: BaseModel, django_capture_on_commit_callbacks: Any, method: str
) -> None:
    quantized = customer_model(alice, base=base, suffix="q", kind="compressed")
    CustomerModel.objects.for_organization(alice.organization).filter(pk=quantized.pk).update(
        compression={"method": "quantize", "source": TINY_LLAMA, "weights": "int8"},
        artifact_kind="full",
    )
    options = {"prune": {"sparsity": 0.3, "recovery_steps": 0}, "distill": {}, "quantize": {}}
    error = refused(
        alice,
        django_capture_on_commit_callbacks,
        400,
        model=quantized.pk,
        method=method,
        options=options[method],
    )
    assert error["code"] == "model_already_quantized"
    assert error["param"] == "model"


def test_a_student_model_must_be_smaller_and_share_the_tokenizer(
    alice: Person, base: BaseModel, minilm: BaseModel, django_capture_on_commit_callbacks: Any
) -> None:
    same = refused(
        alice,
        django_capture_on_commit_callbacks,
        400,
        model=TINY_LLAMA,
        method="distill",
        options={"student_model": TINY_LLAMA},
    )
    assert same["param"] == "options.student_model"
    assert "not smaller" in same["message"]
    other = refused(
        alice,
        django_capture_on_commit_callbacks,
        400,
        model=TINY_LLAMA,
        method="distill",
        options={"student_model": MINILM},
    )
    assert other["param"] == "options.student_model"
    assert "tokenizer" in other["message"]


def test_training_data_of_the_wrong_purpose_format_or_method_is_refused(
    alice: Person,
    base: BaseModel,
    minilm: BaseModel,
    chat_file: str,
    django_capture_on_commit_callbacks: Any,
) -> None:
    from controlplane.datasets.models import File

    File.objects.for_organization(alice.organization).filter(pk=chat_file).update(
        purpose="assistants"
    )
    wrong_purpose = refused(
        alice,
        django_capture_on_commit_callbacks,
        400,
        model=TINY_LLAMA,
        method="prune",
        options={"sparsity": 0.3},
        training_file=chat_file,
    )
    assert wrong_purpose["param"] == "training_file"
    assert wrong_purpose["code"] == "invalid_file_purpose"
    File.objects.for_organization(alice.organization).filter(pk=chat_file).update(
        purpose="fine-tune"
    )
    quantize_trains_not = refused(
        alice,
        django_capture_on_commit_callbacks,
        400,
        model=TINY_LLAMA,
        method="quantize",
        training_file=chat_file,
    )
    assert quantize_trains_not["param"] == "training_file"
    File.objects.for_organization(alice.organization).filter(pk=chat_file).update(
        validation={"format": "preference", "rows": 3}
    )
    wrong_format = refused(
        alice,
        django_capture_on_commit_callbacks,
        400,
        model=TINY_LLAMA,
        method="distill",
        training_file=chat_file,
    )
    assert wrong_format["param"] == "training_file"
    assert "preference" in wrong_format["message"]
    # An embedding model learns from texts: labelled rows are refused here, not by the worker.
    File.objects.for_organization(alice.organization).filter(pk=chat_file).update(
        validation={"format": "classification", "rows": 3}
    )
    labelled = refused(
        alice,
        django_capture_on_commit_callbacks,
        400,
        model=MINILM,
        method="distill",
        training_file=chat_file,
    )
    assert labelled["param"] == "training_file"
    assert "classification" in labelled["message"]
    unknown = refused(
        alice,
        django_capture_on_commit_callbacks,
        404,
        model=TINY_LLAMA,
        method="distill",
        validation_file="file-nope",
    )
    assert unknown["param"] == "validation_file"


def test_a_dataset_version_trains_a_distillation(
    alice: Person, base: BaseModel, django_capture_on_commit_callbacks: Any
) -> None:
    _, version = make_version(alice)
    from controlplane.datasets.models import DatasetVersion

    DatasetVersion.objects.for_organization(alice.organization).filter(pk=version).update(rows=5)
    response = create(
        alice,
        django_capture_on_commit_callbacks,
        model=TINY_LLAMA,
        method="distill",
        options={"student_layers": 1, "steps": 10},
        dataset=version,
    )
    assert response.status_code == 200, response.content
    (spec,) = sent_compression_specs()
    assert spec.training_data is not None
    assert spec.training_data.format == "chat"
    assert spec.options["student_layers"] == 1
    assert spec.options["steps"] == 10


def test_malformed_and_oversized_bodies_are_refused(
    alice: Person, base: BaseModel, django_capture_on_commit_callbacks: Any
) -> None:
    not_json = alice.client.post(
        "/v1/compression/jobs", data=b"{nope", content_type="application/json"
    )
    assert not_json.status_code == 400
    a_list = alice.client.post("/v1/compression/jobs", [1, 2], format="json")
    assert a_list.status_code == 400
    huge = refused(
        alice, django_capture_on_commit_callbacks, 400, model="x" * 5000, method="quantize"
    )
    assert huge["param"] == "model"
