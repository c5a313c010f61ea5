"""`POST /v1/files/{id}/validate`: a training file's tokens, duplicates and price for a model."""

from __future__ import annotations

import io
import json
from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest
from django.test import override_settings
from django.utils import timezone
from rest_framework.test import APIClient
from tokenizers import Tokenizer

from controlplane.datasets.models import File
from controlplane.modelregistry import estimates, services, tokens
from controlplane.modelregistry.models import BaseModel, FileEstimate
from tests.support.models import minilm_dir, tiny_model_dir
from tests.support.people import Person, client_with
from tests.support.registry import base_model, customer_model

pytestmark = pytest.mark.django_db

#: 80 distinct words: changing the last one keeps word 3-shingle similarity near 0.96.
LONG = " ".join(f"{word}{i}" for i, word in enumerate(["refund", "invoice", "order", "ship"] * 20))


def chat_row(user: str, assistant: str) -> dict[str, Any]:
    return {
        "messages": [
            {"role": "user", "content": user},
            {"role": "assistant", "content": assistant},
        ]
    }


#: 20 rows: 2 exact duplicates of row 0, 1 near-duplicate of row 1 (last word changed).
CHAT_ROWS = [
    chat_row("hello", "how can i help today"),
    chat_row("tell me about refunds", LONG + "thanks"),
    *[chat_row(f"where is order {i}", "your order has shipped " * (1 + i % 4)) for i in range(15)],
    chat_row("hello", "how can i help today"),
    chat_row("tell me about refunds", LONG + "bye"),
    chat_row("hello", "how can i help today"),
]


def jsonl(rows: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(row).encode() + b"\n" for row in rows)


def upload(
    person: Person,
    content: bytes,
    capture: Any,
    *,
    name: str = "train.jsonl",
    purpose: str = "fine-tune",
    validate: bool = True,
) -> dict[str, Any]:
    f = io.BytesIO(content)
    f.name = name
    with capture(execute=validate):
        response = person.client.post(
            "/v1/files", {"file": f, "purpose": purpose}, format="multipart"
        )
    assert response.status_code == 200, response.content
    return response.json()


def report(person: Person, file_id: str, **body: Any) -> Any:
    return person.client.post(f"/v1/files/{file_id}/validate", body, format="json")


def reference(path: Any) -> Tokenizer:
    tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return tokenizer


def chatml(row: dict[str, Any]) -> str:
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in row["messages"])


@pytest.fixture
def llama(db: None) -> BaseModel:
    return services.base_model_import(
        path=tiny_model_dir("llama"),
        name="atelier-tiny-llama",
        price_per_1k_training_tokens=Decimal("0.000800"),
    )


@pytest.fixture
def minilm(db: None) -> BaseModel:
    return services.base_model_import(
        path=minilm_dir(),
        name="all-MiniLM-L6-v2",
        price_per_1k_training_tokens=Decimal("0.000100"),
        copy=False,
    )


@pytest.fixture
def chat_file(alice: Person, django_capture_on_commit_callbacks: Any) -> dict[str, Any]:
    return upload(alice, jsonl(CHAT_ROWS), django_capture_on_commit_callbacks)


def test_a_small_file_is_reported_at_once_with_tokens_duplicates_and_price(
    alice: Person, llama: BaseModel, chat_file: dict[str, Any]
) -> None:
    ref = reference(tiny_model_dir("llama"))
    lengths = [len(ref.encode(chatml(row)).ids) for row in CHAT_ROWS]

    response = report(alice, chat_file["id"], model="atelier-tiny-llama")

    assert response.status_code == 200, response.content
    body = response.json()
    assert body["object"] == "file.validation"
    assert body["status"] == "completed"
    assert (body["file_id"], body["model"]) == (chat_file["id"], "atelier-tiny-llama")
    assert (body["format"], body["rows"]) == ("chat", 20)
    assert (body["n_epochs"], body["n_epochs_auto"]) == (3, False)
    counted = body["tokens"]
    assert counted["rows"] == 20
    assert counted["total_tokens"] == sum(lengths)
    assert counted["trained_tokens"] == sum(min(n, 256) for n in lengths)
    assert (counted["per_row"]["min"], counted["per_row"]["max"]) == (min(lengths), max(lengths))
    assert {"mean", "p50", "p95"} <= set(counted["per_row"])
    assert counted["context_length"] == 256
    assert counted["rows_over_context"] == sum(n > 256 for n in lengths)
    assert body["duplicates"] == {"exact": 2, "near": 1, "near_threshold": 0.9}
    assert (
        body["lengths"]
        == alice.client.get(f"/v1/files/{chat_file['id']}").json()["validation"]["lengths"]
    )
    trained = counted["trained_tokens"]
    assert body["estimated_price"] == {
        "currency": "usd",
        "price_per_1k_training_tokens": "0.000800",
        "trained_tokens_per_epoch": trained,
        "n_epochs": 3,
        "billable_tokens": trained * 3,
        "amount": str(Decimal(trained * 3) * Decimal("0.000800") / 1000),
    }
    assert any("2 exact and 1 near-duplicate" in w for w in body["warnings"])


def test_auto_epochs_follow_the_dataset_size(
    alice: Person, llama: BaseModel, chat_file: dict[str, Any]
) -> None:
    body = report(alice, chat_file["id"], model="atelier-tiny-llama", n_epochs="auto").json()

    assert (body["n_epochs"], body["n_epochs_auto"]) == (5, True)  # 20 rows: 100 examples
    trained = body["tokens"]["trained_tokens"]
    assert body["estimated_price"]["billable_tokens"] == trained * 5


def test_the_price_scales_with_epochs_from_one_kept_count(
    alice: Person, llama: BaseModel, chat_file: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    count = tokens.count_dataset_tokens

    def counting(**kwargs: Any) -> Any:
        calls.append(kwargs["storage_name"])
        return count(**kwargs)

    monkeypatch.setattr(tokens, "count_dataset_tokens", counting)

    one = report(alice, chat_file["id"], model="atelier-tiny-llama", n_epochs=1).json()
    ten = report(alice, chat_file["id"], model="atelier-tiny-llama", n_epochs=10).json()

    assert len(calls) == 1
    assert Decimal(ten["estimated_price"]["amount"]) == 10 * Decimal(
        one["estimated_price"]["amount"]
    )
    assert FileEstimate.objects.for_organization(alice.organization).count() == 1


def test_max_seq_len_caps_trained_tokens_and_counts_rows_over_it(
    alice: Person, llama: BaseModel, chat_file: dict[str, Any]
) -> None:
    ref = reference(tiny_model_dir("llama"))
    lengths = [len(ref.encode(chatml(row)).ids) for row in CHAT_ROWS]

    body = report(alice, chat_file["id"], model="atelier-tiny-llama", max_seq_len=32).json()

    assert body["max_seq_len"] == 32
    assert body["tokens"]["trained_tokens"] == sum(min(n, 32) for n in lengths)
    assert body["tokens"]["rows_over_max_seq_len"] == sum(n > 32 for n in lengths) > 0
    assert any("longer than max_seq_len" in w for w in body["warnings"])
    assert FileEstimate.objects.for_organization(alice.organization).get().max_seq_len == 32


def test_classification_files_show_their_labels_and_encoder_tokens(
    alice: Person, minilm: BaseModel, django_capture_on_commit_callbacks: Any
) -> None:
    rows = [{"text": f"review number {i} was good", "label": "pos"} for i in range(6)]
    rows += [{"text": "terrible", "label": "neg"}]
    file = upload(alice, jsonl(rows), django_capture_on_commit_callbacks)
    ref = reference(minilm_dir())

    body = report(alice, file["id"], model="all-MiniLM-L6-v2").json()

    assert body["label_counts"] == {"pos": 6, "neg": 1}
    assert body["tokens"]["total_tokens"] == sum(len(ref.encode(r["text"]).ids) for r in rows)
    assert body["warnings"] == []
    assert body["estimated_price"]["price_per_1k_training_tokens"] == "0.000100"


def test_a_model_that_cannot_train_the_format_is_reported_with_a_warning(
    alice: Person, minilm: BaseModel, chat_file: dict[str, Any]
) -> None:
    body = report(alice, chat_file["id"], model="all-MiniLM-L6-v2").json()

    assert body["status"] == "completed"
    assert any("does not train causal_lm" in w for w in body["warnings"])


def test_duplicates_are_counted_once_per_file_whatever_the_model(
    alice: Person,
    llama: BaseModel,
    minilm: BaseModel,
    chat_file: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = []
    original = estimates.preprocess_stream

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(estimates, "preprocess_stream", counting)

    first = report(alice, chat_file["id"], model="atelier-tiny-llama").json()
    second = report(alice, chat_file["id"], model="all-MiniLM-L6-v2").json()

    assert first["duplicates"] == second["duplicates"]
    assert len(calls) == 1
    assert first["tokens"]["total_tokens"] != second["tokens"]["total_tokens"]


@override_settings(FILE_ESTIMATE_SYNC_MAX_BYTES=0)
def test_a_large_file_is_counted_on_the_control_queue_and_202_until_then(
    alice: Person,
    llama: BaseModel,
    chat_file: dict[str, Any],
    django_capture_on_commit_callbacks: Any,
) -> None:
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        queued = report(alice, chat_file["id"], model="atelier-tiny-llama")
    assert queued.status_code == 202
    assert queued.json()["status"] == "in_progress"
    assert queued.json()["tokens"] is None
    assert queued.json()["estimated_price"] is None
    assert len(callbacks) == 1

    # Asked again before a worker ran it: still in progress, nothing sent twice.
    with django_capture_on_commit_callbacks(execute=False) as again:
        assert report(alice, chat_file["id"], model="atelier-tiny-llama").status_code == 202
    assert again == []

    callbacks[0]()  # the worker runs the task (eagerly, in tests)

    done = report(alice, chat_file["id"], model="atelier-tiny-llama")
    assert done.status_code == 200
    assert done.json()["status"] == "completed"
    assert done.json()["tokens"]["rows"] == 20


@override_settings(FILE_ESTIMATE_SYNC_MAX_BYTES=0)
def test_an_estimate_abandoned_by_a_dead_worker_is_sent_again(
    alice: Person,
    llama: BaseModel,
    chat_file: dict[str, Any],
    django_capture_on_commit_callbacks: Any,
) -> None:
    with django_capture_on_commit_callbacks(execute=False):
        report(alice, chat_file["id"], model="atelier-tiny-llama")
    FileEstimate.objects.for_organization(alice.organization).update(
        started_at=timezone.now() - timedelta(hours=4)
    )

    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        assert report(alice, chat_file["id"], model="atelier-tiny-llama").status_code == 202
    assert len(callbacks) == 1

    assert report(alice, chat_file["id"], model="atelier-tiny-llama").json()["status"] == (
        "completed"
    )


def test_a_failed_count_is_shown_then_retried(
    alice: Person, llama: BaseModel, chat_file: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(**kwargs: Any) -> Any:
        raise OSError("storage unreachable")

    monkeypatch.setattr(tokens, "count_dataset_tokens", broken)
    failed = report(alice, chat_file["id"], model="atelier-tiny-llama")
    assert failed.status_code == 200
    assert failed.json()["status"] == "failed"
    assert "OSError" in failed.json()["error"]
    assert failed.json()["estimated_price"] is None

    monkeypatch.undo()
    assert report(alice, chat_file["id"], model="atelier-tiny-llama").json()["status"] == "failed"
    with override_settings(FILE_ESTIMATE_RETRY_SECONDS=0):
        retried = report(alice, chat_file["id"], model="atelier-tiny-llama").json()
    assert retried["status"] == "completed"
    assert retried["error"] is None


@pytest.mark.parametrize("n_epochs", [0, 51, 2.5, True, "three", None, [3]])
def test_invalid_epochs_are_400(
    alice: Person, llama: BaseModel, chat_file: dict[str, Any], n_epochs: Any
) -> None:
    response = report(alice, chat_file["id"], model="atelier-tiny-llama", n_epochs=n_epochs)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "n_epochs"
    assert '"auto"' in response.json()["error"]["message"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({}, "model"),
        ({"model": "atelier-tiny-llama", "max_seq_len": 0}, "max_seq_len"),
        ({"model": "atelier-tiny-llama", "max_seq_len": 257}, "max_seq_len"),
        ({"model": "atelier-tiny-llama", "epochs": 3}, "epochs"),
    ],
)
def test_invalid_bodies_are_400(
    alice: Person, llama: BaseModel, chat_file: dict[str, Any], body: dict[str, Any], param: str
) -> None:
    response = report(alice, chat_file["id"], **body)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == param


def test_unknown_inactive_and_foreign_models_are_404_model_not_found(
    alice: Person, charlie: Person, llama: BaseModel, chat_file: dict[str, Any]
) -> None:
    base_model("retired", is_active=False)
    theirs = customer_model(charlie, base=llama)
    for model_id in ("nope", "retired", theirs.pk):
        response = report(alice, chat_file["id"], model=model_id)
        assert response.status_code == 404, model_id
        assert response.json()["error"]["code"] == "model_not_found"
        assert response.json()["error"]["param"] == "model"


def test_an_own_fine_tuned_model_is_400_pointing_at_its_base(
    alice: Person, llama: BaseModel, chat_file: dict[str, Any]
) -> None:
    mine = customer_model(alice, base=llama)
    response = report(alice, chat_file["id"], model=mine.pk)
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_model"
    assert "atelier-tiny-llama" in response.json()["error"]["message"]


def test_outsider_gets_404_for_a_foreign_file(
    alice: Person, charlie: Person, llama: BaseModel, chat_file: dict[str, Any]
) -> None:
    response = report(charlie, chat_file["id"], model="atelier-tiny-llama")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"
    assert not FileEstimate.objects.for_organization(charlie.organization).exists()


def test_a_deleted_file_is_404(alice: Person, llama: BaseModel, chat_file: dict[str, Any]) -> None:
    alice.client.delete(f"/v1/files/{chat_file['id']}")
    assert report(alice, chat_file["id"], model="atelier-tiny-llama").status_code == 404


def test_a_file_still_being_validated_is_409(
    alice: Person, llama: BaseModel, django_capture_on_commit_callbacks: Any
) -> None:
    file = upload(alice, jsonl(CHAT_ROWS), django_capture_on_commit_callbacks, validate=False)

    response = report(alice, file["id"], model="atelier-tiny-llama")

    assert response.status_code == 409
    assert response.json()["error"]["code"] == "file_not_ready"
    assert "'processed'" in response.json()["error"]["message"]


def test_a_file_that_failed_validation_is_409_with_the_reason(
    alice: Person, llama: BaseModel, django_capture_on_commit_callbacks: Any
) -> None:
    file = upload(alice, jsonl(CHAT_ROWS) + b"[1, 2]\n", django_capture_on_commit_callbacks)
    assert File.objects.for_organization(alice.organization).get().status == "error"

    response = report(alice, file["id"], model="atelier-tiny-llama")

    assert response.status_code == 409
    assert response.json()["error"]["code"] == "file_invalid"
    assert "line 21" in response.json()["error"]["message"]


def test_files_that_are_not_training_data_are_400(
    alice: Person, llama: BaseModel, django_capture_on_commit_callbacks: Any
) -> None:
    file = upload(
        alice, b"anything", django_capture_on_commit_callbacks, name="x.bin", purpose="user_data"
    )
    response = report(alice, file["id"], model="atelier-tiny-llama")
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_file_purpose"


def test_reading_a_file_is_enough_to_price_a_job(
    alice: Person, llama: BaseModel, chat_file: dict[str, Any]
) -> None:
    def key(scopes: list[str]) -> APIClient:
        created = alice.client.post(
            "/v1/organization/api_keys", {"name": "k", "scopes": scopes}, format="json"
        )
        return client_with(created.json()["value"])

    path = f"/v1/files/{chat_file['id']}/validate"
    body = {"model": "atelier-tiny-llama"}
    assert key(["read_only"]).post(path, body, format="json").status_code == 200
    refused = key(["models.read"]).post(path, body, format="json")
    assert refused.status_code == 403
    assert "files.read" in refused.json()["error"]["message"]
    assert APIClient().post(path, body, format="json").status_code == 401


def test_a_small_files_count_left_by_a_dead_web_process_is_redone(
    alice: Person, llama: BaseModel, chat_file: dict[str, Any]
) -> None:
    file = File.objects.for_organization(alice.organization).get()
    FileEstimate.objects.create(
        organization=alice.organization,
        file=file,
        base=llama,
        started_at=timezone.now() - timedelta(minutes=1),
    )
    assert report(alice, chat_file["id"], model="atelier-tiny-llama").status_code == 202

    FileEstimate.objects.for_organization(alice.organization).update(
        started_at=timezone.now() - timedelta(minutes=6)
    )
    assert report(alice, chat_file["id"], model="atelier-tiny-llama").status_code == 200


def test_a_file_deleted_before_its_count_ran_fails_the_estimate(
    alice: Person, llama: BaseModel, chat_file: dict[str, Any]
) -> None:
    file = File.objects.for_organization(alice.organization).get()
    estimate = FileEstimate.objects.create(
        organization=alice.organization, file=file, base=llama, started_at=timezone.now()
    )
    alice.client.delete(f"/v1/files/{file.pk}")

    done = estimates.file_estimate_compute(
        estimate_id=estimate.pk, organization_id=alice.organization.pk
    )

    assert (done.status, done.error) == ("failed", "The file was deleted.")
