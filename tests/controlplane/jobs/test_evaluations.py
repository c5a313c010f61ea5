"""`/v1/evaluations`: score models the caller may use on one of their files or dataset
versions, on the GPU workers, with the jobs' lifecycle, cancel, errors, cross-tenant 404,
a price estimate before it runs and billing (inference prompt tokens) after."""

from __future__ import annotations

import io
import json
from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest
from django.core.files.base import ContentFile
from django.core.files.storage import default_storage
from django.db.models import Sum
from django.utils import timezone
from rest_framework.test import APIClient
from tokenizers import Tokenizer

from controlplane.billing.models import LedgerEntry, Meter
from controlplane.billing.prices import price_set
from controlplane.billing.selectors import priced
from controlplane.datasets.models import DatasetVersion, File
from controlplane.jobs.dispatch import job_prefix
from controlplane.jobs.models import Job
from controlplane.jobs.reports import report_apply
from controlplane.modelregistry.models import BaseModel, CustomerModel
from controlplane.modelregistry.services import customer_model_register
from controlplane.modelregistry.tokens import count_dataset_tokens
from gpuworkers.evaluation.task import handle
from jobcontracts import training as contract
from tests.controlplane.datasets.test_catalog import publish, ready_version
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
from tests.support.models import minilm_dir
from tests.support.pairs import PAIRS
from tests.support.people import Person, sign_up
from tests.support.registry import customer_model

pytestmark = pytest.mark.django_db

MINILM = "all-MiniLM-L6-v2"
#: The inference prompt-token price the billing migration seeds: $0.50 per 1M tokens.
SEEDED_PROMPT_PRICE = Decimal("0.50") / 1_000_000


def pairs_rows(pairs: list[tuple[str, str]] = PAIRS) -> bytes:
    return b"".join(json.dumps({"query": q, "positive": p}).encode() + b"\n" for q, p in pairs)


def register_minilm() -> BaseModel:
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


def minilm_tokens(texts: list[str]) -> int:
    """Tokens MiniLM reads of `texts`: [CLS] … [SEP], straight from its tokenizer.json."""
    tokenizer = Tokenizer.from_file(str(minilm_dir() / "tokenizer.json"))
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return sum(len(e.ids) for e in tokenizer.encode_batch(texts))


def run_worker(spec: Any, captured: Any) -> None:
    """The real worker code runs the attempt; its reports are applied as the control
    plane's report task applies them."""
    reports = Reports()
    with captured(execute=True):
        outcome = handle(spec.to_json(), reports)
        assert outcome["status"] == "succeeded", reports.of("failed")
        assert {report_apply(r.to_json()) for r in reports.items} <= {"applied", "heartbeat"}


def billed(person: Person, job_id: str) -> Decimal:
    """What the evaluation's ledger entries cost at the prices in force when they occurred."""
    entries = priced(LedgerEntry.objects.for_organization(person.organization)).filter(
        reference=job_id
    )
    total = entries.aggregate(total=Sum("cost"))["total"]
    return Decimal(total).quantize(Decimal("0.000001"))


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
    # Priced before it runs: the file's tokens for the model's tokenizer, at the inference
    # prompt-token price in force.
    stored = File.objects.for_organization(alice.organization).get(pk=chat_file)
    counted = count_dataset_tokens(
        base=BaseModel.objects.get(pk=TINY_LLAMA),
        storage_name=stored.storage_name,
        format="chat",
        max_seq_len=256,  # the tiny model's context
    )
    assert created["estimated_tokens"] == counted.trained_tokens > 0
    assert Decimal(created["estimated_price"]) == (
        created["estimated_tokens"] * SEEDED_PROMPT_PRICE
    ).quantize(Decimal("0.000001"))
    assert created["dataset"] is None
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
    # Billed for the tokens the worker read, at the price the estimate used.
    assert (
        Decimal(done["price"])
        == billed(alice, created["id"])
        == (entry.quantity * SEEDED_PROMPT_PRICE).quantize(Decimal("0.000001"))
    )
    assert done["estimated_tokens"] == created["estimated_tokens"]
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


# --- embedding models on pairs -------------------------------------------------------------


def embedding_copy(person: Person, base: BaseModel) -> CustomerModel:
    """A compressed embedding model of `person`'s: a full artifact (here MiniLM's own
    weights, as a bf16 copy would be laid out), made by a compression job."""
    return customer_model_register(
        organization=person.organization,
        base=base,
        job_id="cmpjob-embedcopy",
        suffix="small",
        kind="final",
        step=None,
        uri=minilm_dir().as_uri(),
        artifact_kind="full",
        task="embeddings",
        labels=[],
    )


def test_embedding_models_are_scored_on_pairs_with_cosine_recall_and_per_row_ranks(
    alice: Person, django_capture_on_commit_callbacks: Any
) -> None:
    captured = django_capture_on_commit_callbacks
    base = register_minilm()
    compressed = embedding_copy(alice, base)
    pairs = upload_file(alice, pairs_rows(), captured)
    assert alice.client.get(f"/v1/files/{pairs}").json()["status"] == "processed"

    response = create(alice, captured, models=[MINILM, compressed.pk], file=pairs)

    assert response.status_code == 200, response.content
    created = response.json()
    assert created["format"] == "pairs"
    # Every query and positive, [CLS] and [SEP] included, once per model.
    texts = [text for pair in PAIRS for text in pair]
    assert created["estimated_tokens"] == 2 * minilm_tokens(texts)
    assert Decimal(created["estimated_price"]) == (
        created["estimated_tokens"] * SEEDED_PROMPT_PRICE
    ).quantize(Decimal("0.000001"))
    (spec,) = sent_evaluation_specs()
    assert spec.task == "embeddings"
    assert [(m.name, m.uri, m.adapter_uri) for m in spec.models] == [
        (MINILM, base.uri, None),
        (compressed.pk, compressed.uri, None),
    ]

    run_worker(spec, captured)

    done = evaluation_of(alice, created["id"])
    assert done["status"] == "succeeded", done["error"]
    assert done["rows"] == len(PAIRS)
    metrics = done["metrics"][MINILM]
    assert set(metrics) == {"mean_cosine", "recall_at_1", "recall_at_5", "recall_at_10"}
    # MiniLM matches each question to its own answer among these twelve.
    assert metrics["recall_at_10"] >= metrics["recall_at_5"] >= metrics["recall_at_1"] >= 0.75
    assert 0.3 < metrics["mean_cosine"] < 1.0
    assert [row["model"] for row in done["table"]] == [MINILM, compressed.pk]
    assert done["table"][1]["mean_cosine"] == pytest.approx(metrics["mean_cosine"], abs=1e-5)

    content = alice.client.get(f"/v1/files/{done['output_file_id']}/content")
    lines = [json.loads(line) for line in b"".join(content.streaming_content).splitlines()]
    assert [line["row"] for line in lines] == list(range(len(PAIRS)))
    results = [line["results"][MINILM] for line in lines]
    assert set(results[0]) == {"cosine", "rank"}
    # The metrics are the per-row results' summary.
    mean = sum(r["cosine"] for r in results) / len(results)
    assert metrics["mean_cosine"] == pytest.approx(mean, abs=1e-5)
    for k in (1, 5, 10):
        share = sum(r["rank"] <= k for r in results) / len(results)
        assert metrics[f"recall_at_{k}"] == pytest.approx(share, abs=1e-6)
    # The results file holds scores, never the texts.
    assert PAIRS[0][0].encode() not in b"".join(content.streaming_content)

    # Billed: what each model read, as its inference prompt tokens; the estimate was exact.
    entries = LedgerEntry.objects.for_organization(alice.organization).filter(
        reference=created["id"]
    )
    assert sorted(entries.values_list("model", "meter", "quantity")) == sorted(
        [
            (MINILM, Meter.PROMPT_TOKENS, minilm_tokens(texts)),
            (compressed.pk, Meter.PROMPT_TOKENS, minilm_tokens(texts)),
        ]
    )
    assert done["usage"]["prompt_tokens"] == created["estimated_tokens"]
    assert (
        Decimal(done["price"])
        == billed(alice, created["id"])
        == Decimal(created["estimated_price"])
    )


def test_each_model_is_estimated_and_billed_at_its_own_prompt_price(
    alice: Person, chat_file: str, django_capture_on_commit_callbacks: Any
) -> None:
    captured = django_capture_on_commit_callbacks
    tuned = customer_model(alice, base=register_tiny_llama(), suffix="support")
    price_set(
        meter=Meter.PROMPT_TOKENS,
        unit_price=Decimal("30"),  # $30 per 1M prompt tokens for the fine-tune
        effective_from=timezone.now() - timedelta(minutes=1),
        model=tuned.pk,
    )
    created = create(alice, captured, models=[TINY_LLAMA, tuned.pk], file=chat_file).json()

    per_model = created["estimated_tokens"] // 2
    assert created["estimated_tokens"] == 2 * per_model > 0  # one tokenizer: counted once
    expected = per_model * SEEDED_PROMPT_PRICE + per_model * Decimal("30") / 1_000_000
    assert Decimal(created["estimated_price"]) == expected.quantize(Decimal("0.000001"))

    worker = Worker(created["id"], 1)
    worker.report(contract.STARTED, device="cpu", models=[TINY_LLAMA, tuned.pk], rows=5)
    job = Job.objects.dangerously_unscoped().get(pk=created["id"])
    default_storage.save(f"{job_prefix(job)}/results.jsonl", ContentFile(b'{"row": 0}\n'))
    # The worker read fewer tokens than estimated (its chat template is shorter).
    worker.report(
        contract.SUCCEEDED,
        artifact_uri=worker.uri("results.jsonl"),
        rows=5,
        metrics={TINY_LLAMA: {"loss": 2.0}, tuned.pk: {"loss": 1.0}},
        tokens={TINY_LLAMA: 40_000, tuned.pk: 40_000},
    )
    done = evaluation_of(alice, created["id"])
    assert done["usage"] == {"prompt_tokens": 80_000}
    # 40k at $0.50/1M + 40k at $30/1M: what was read, not what was estimated.
    assert done["price"] == "1.220000"
    assert billed(alice, created["id"]) == Decimal("1.22")


def test_a_pairs_file_needs_an_embedding_model_and_an_lm_file_a_language_model(
    alice: Person, chat_file: str, django_capture_on_commit_callbacks: Any
) -> None:
    captured = django_capture_on_commit_callbacks
    register_minilm()
    pairs = upload_file(alice, pairs_rows(), captured)

    error = refused(alice, captured, 400, model=TINY_LLAMA, file=pairs)
    assert error["param"] == "models"
    assert error["code"] == "unsupported_model"
    assert "'pairs' file is scored on embeddings models" in error["message"]
    assert f"'{TINY_LLAMA}' is a causal_lm model" in error["message"]

    error = refused(alice, captured, 400, models=[TINY_LLAMA, MINILM], file=chat_file)
    assert "'chat' file is scored on causal_lm models" in error["message"]
    assert f"'{MINILM}' is an embeddings model" in error["message"]


# --- dataset versions ------------------------------------------------------------------------


def own_version(person: Person, captured: Any, content: bytes) -> str:
    file = upload_file(person, content, captured)
    dataset = person.client.post("/v1/datasets", {"name": "eval"}, format="json").json()["id"]
    with captured(execute=True):
        version = person.client.post(
            f"/v1/datasets/{dataset}/versions", {"file_ids": [file]}, format="json"
        ).json()
    return str(version["id"])


def test_an_evaluation_runs_on_a_dataset_version_instead_of_a_file(
    alice: Person, django_capture_on_commit_callbacks: Any
) -> None:
    captured = django_capture_on_commit_callbacks
    register_tiny_llama()
    version_id = own_version(alice, captured, chat_rows(4))
    version = DatasetVersion.objects.for_organization(alice.organization).get(pk=version_id)
    assert version.status == "ready"

    response = create(alice, captured, model=TINY_LLAMA, dataset=version_id)

    assert response.status_code == 200, response.content
    created = response.json()
    assert (created["dataset"], created["file"]) == (version_id, None)
    assert created["estimated_tokens"] > 0
    (spec,) = sent_evaluation_specs()
    assert spec.data.uri.endswith(version.storage_name)
    assert spec.data.format == "chat"
    run_worker(spec, captured)
    done = evaluation_of(alice, created["id"])
    assert done["status"] == "succeeded"
    assert done["rows"] == 4
    # A retry scores the same version again.
    job = Job.objects.dangerously_unscoped().get(pk=created["id"])
    from controlplane.jobs.evaluation import retry_request

    assert retry_request(job)["dataset"] == version_id
    assert "file" not in retry_request(job)


def test_a_partner_version_needs_an_approved_grant_and_a_foreign_one_is_a_404(
    alice: Person, charlie: Person, django_capture_on_commit_callbacks: Any
) -> None:
    captured = django_capture_on_commit_callbacks
    register_tiny_llama()
    partner = sign_up("dana@mathdata.test", "MathData", kinds=["data_partner"])
    listing = publish(partner, ready_version(partner, captured), auto_approve=True)
    version = listing["dataset_version_id"]

    error = refused(alice, captured, 404, model=TINY_LLAMA, dataset=version)
    assert error["param"] == "dataset"
    theirs = own_version(charlie, captured, chat_rows(3))
    error = refused(alice, captured, 404, model=TINY_LLAMA, dataset=theirs)
    assert error["param"] == "dataset"
    assert theirs in error["message"]
    error = refused(alice, captured, 404, model=TINY_LLAMA, dataset="dsv-nope")
    assert error["param"] == "dataset"

    alice.client.post(f"/v1/catalog/{listing['id']}/access_requests")
    response = create(alice, captured, model=TINY_LLAMA, dataset=version)
    assert response.status_code == 200, response.content
    assert response.json()["dataset"] == version
    (spec,) = sent_evaluation_specs()
    assert spec.data.format == "prompt_completion"


# --- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "source",
    [
        {},  # neither
        {"file": "FILE", "dataset": "dsv-x"},  # both
    ],
)
def test_exactly_one_of_file_and_dataset_is_given(
    alice: Person, chat_file: str, django_capture_on_commit_callbacks: Any, source: dict[str, str]
) -> None:
    body = {k: chat_file if v == "FILE" else v for k, v in source.items()}
    error = refused(alice, django_capture_on_commit_callbacks, 400, model=TINY_LLAMA, **body)
    assert error["param"] == "file"
    assert "'dataset'" in error["message"]


def test_an_empty_file_or_an_empty_version_is_refused(
    alice: Person, django_capture_on_commit_callbacks: Any
) -> None:
    captured = django_capture_on_commit_callbacks
    register_tiny_llama()
    # The Files API refuses a 0-byte upload; blank lines upload and fail validation.
    blank = io.BytesIO(b"\n\n  \n")
    blank.name = "blank.jsonl"
    with captured(execute=True):
        file = alice.client.post(
            "/v1/files", {"file": blank, "purpose": "fine-tune"}, format="multipart"
        ).json()["id"]
    error = refused(alice, captured, 400, model=TINY_LLAMA, file=file)
    assert error["param"] == "file"
    assert "no rows" in error["message"]

    # Rows that validate but that cleaning drops (no assistant content left): a version
    # with no rows.
    hollow = b"".join(
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": f"hi {i}"},
                    {"role": "assistant", "content": " "},
                ]
            }
        ).encode()
        + b"\n"
        for i in range(3)
    )
    version = own_version(alice, captured, hollow)
    assert DatasetVersion.objects.for_organization(alice.organization).get(pk=version).rows == 0
    error = refused(alice, captured, 400, model=TINY_LLAMA, dataset=version)
    assert (error["param"], error["code"]) == ("dataset", "empty_file")


def test_a_malformed_body_or_no_api_key_is_refused(
    alice: Person, chat_file: str, django_capture_on_commit_callbacks: Any
) -> None:
    response = alice.client.post(
        "/v1/evaluations", data=b"{not json", content_type="application/json"
    )
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"
    error = refused(
        alice, django_capture_on_commit_callbacks, 400, models=TINY_LLAMA, file=chat_file
    )
    assert error["param"] == "models"
    error = refused(alice, django_capture_on_commit_callbacks, 400, model=TINY_LLAMA, file=["x"])
    assert error["param"] == "file"
    # `dataset` is a field now (not an unknown one), and it takes a version id.
    error = refused(alice, django_capture_on_commit_callbacks, 400, model=TINY_LLAMA, dataset=[1])
    assert error["param"] == "dataset"
    assert "Not a valid string" in error["message"]

    anonymous = APIClient().post(
        "/v1/evaluations", {"model": TINY_LLAMA, "file": chat_file}, format="json"
    )
    assert anonymous.status_code == 401
    assert APIClient().get("/v1/evaluations").status_code == 401
    assert not Job.objects.for_organization(alice.organization).exists()
