"""Model cards (`/v1/models/{id}/card`): lineage from the job that made the model (its
method, hyperparameters, exact data, metrics, compression report), the owners' text, in
JSON and Markdown; never another tenant's data."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest

from controlplane.audit.models import AuditLog
from controlplane.core.ids import new_compression_job_id
from controlplane.jobs.models import Job
from controlplane.modelregistry.cards import CARD_TEXT_MAX
from controlplane.modelregistry.models import CustomerModel
from controlplane.modelregistry.services import customer_model_register
from jobcontracts import training as contract
from tests.controlplane.datasets.test_catalog import ROWS, publish, ready_version
from tests.support.jobs import TINY_LLAMA, Worker, chat_rows, create_job, register_tiny_llama
from tests.support.jobs import upload_file as upload
from tests.support.people import Person, client_with, join, sign_up

pytestmark = pytest.mark.django_db


def card(person: Person, model_id: str, **headers: str) -> Any:
    return person.client.get(f"/v1/models/{model_id}/card", **headers)


def fine_tune(person: Person, captured: Any, **body: Any) -> tuple[str, str]:
    """A fine-tuning job run to success by a played worker: (job id, model id)."""
    register_tiny_llama()
    response = create_job(person, captured, model=TINY_LLAMA, **body)
    assert response.status_code == 200, response.content
    job_id = response.json()["id"]
    worker = Worker(job_id, 1)
    with captured(execute=True):
        worker.report(contract.STARTED, total_steps=4)
        worker.report(contract.METRICS, step=2, valid_loss=1.5, valid_mean_token_accuracy=0.4)
        worker.report(
            contract.CHECKPOINT,
            step=2,
            uri=worker.uri("checkpoints", "step-2"),
            metrics={"train_loss": 1.2, "valid_loss": 1.5},
        )
        worker.report(contract.METRICS, step=4, valid_loss=0.75, valid_mean_token_accuracy=0.6)
        worker.report(contract.METRICS, step=4, test_loss=0.9, test_rows=5.0)  # held-out rows
        worker.report(
            contract.SUCCEEDED,
            step=4,
            trained_tokens=400,
            artifact_uri=worker.uri("final"),
            artifact_kind="lora",
        )
    model = Job.objects.for_organization(person.organization).get(pk=job_id).fine_tuned_model
    return job_id, model


def test_a_fine_tuned_models_card_holds_its_lineage_and_metrics(
    alice: Person, django_capture_on_commit_callbacks: Any
) -> None:
    captured = django_capture_on_commit_callbacks
    training = upload(alice, chat_rows(30), captured, name="orders.jsonl")
    validation = upload(alice, chat_rows(5), captured, name="held-out.jsonl")
    job_id, model_id = fine_tune(
        alice,
        captured,
        training_file=training,
        validation_file=validation,
        hyperparameters={"n_epochs": 2, "learning_rate_multiplier": 0.5},
        suffix="orders",
    )

    response = card(alice, model_id)

    assert response.status_code == 200, response.content
    body = response.json()
    assert body["object"] == "model.card"
    assert (body["id"], body["kind"], body["task"]) == (model_id, "final", "causal_lm")
    assert body["base_model"]["id"] == TINY_LLAMA
    assert (body["method"], body["adapter"]) == ("lora", "lora")
    assert body["hyperparameters"]["n_epochs"] == 2
    assert body["hyperparameters"]["learning_rate_multiplier"] == 0.5
    assert body["job"]["id"] == job_id
    assert body["job"]["trained_tokens"] == 400
    files = {f["role"]: f for f in body["training_data"]["files"]}
    assert (files["training"]["id"], files["validation"]["id"]) == (training, validation)
    assert files["training"]["rows"] == 30
    assert files["training"]["filename"] == "orders.jsonl"
    assert len(files["training"]["sha256"]) == 64
    # The last evaluation, not the first.
    assert body["metrics"]["validation"] == {
        "step": 4,
        "valid_loss": 0.75,
        "valid_mean_token_accuracy": 0.6,
    }
    assert body["metrics"]["test"] == {"test_loss": 0.9, "test_rows": 5.0}
    assert body["created_by"] == {"name": "alice"}
    assert body["compression"] is None

    checkpoint = f"{model_id}:ckpt-step-2"
    at_step = card(alice, checkpoint).json()
    assert at_step["kind"] == "checkpoint"
    assert at_step["metrics"]["validation"] == {"step": 2, "valid_loss": 1.5}
    assert at_step["metrics"]["test"] is None  # only the final model is tested


def test_a_dataset_versions_recipe_hash_and_removed_rows_are_on_the_card(
    alice: Person, django_capture_on_commit_callbacks: Any
) -> None:
    captured = django_capture_on_commit_callbacks
    file_id = upload(alice, chat_rows(20) + chat_rows(5), captured)  # 5 exact duplicates
    dataset = alice.client.post("/v1/datasets", {"name": "orders"}, format="json").json()["id"]
    with captured(execute=True):
        version = alice.client.post(
            f"/v1/datasets/{dataset}/versions",
            {"file_ids": [file_id], "recipe": {"dedupe_exact": True}},
            format="json",
        ).json()
    version = alice.client.get(f"/v1/datasets/{dataset}/versions/{version['id']}").json()
    assert version["status"] == "ready"
    _, model_id = fine_tune(alice, captured, dataset=version["id"])

    body = card(alice, model_id).json()

    (shown,) = body["training_data"]["dataset_versions"]
    assert shown["id"] == version["id"]
    assert shown["source_files"] == [file_id]
    assert shown["recipe"]["dedupe_exact"] is True
    assert shown["sha256"] == version["sha256"]
    assert len(shown["sha256"]) == 64
    assert shown["rows"] == 20
    assert shown["preprocessing"]["rows_in"] == 25
    assert shown["preprocessing"]["removed"]["exact_duplicate"] == 5
    assert body["training_data"]["licensed_datasets"] == []


def test_a_partner_licensed_dataset_shows_the_listing_and_terms_only(
    alice: Person, django_capture_on_commit_callbacks: Any
) -> None:
    captured = django_capture_on_commit_callbacks
    partner = sign_up("dana@mathdata.test", "MathData", kinds=["data_partner"])
    listing = publish(partner, ready_version(partner, captured), auto_approve=True)
    alice.client.post(f"/v1/catalog/{listing['id']}/access_requests")
    _, model_id = fine_tune(alice, captured, dataset=listing["dataset_version_id"])

    response = card(alice, model_id)

    body = response.json()
    assert body["training_data"]["dataset_versions"] == []
    assert body["training_data"]["files"] == []
    assert body["training_data"]["licensed_datasets"] == [
        {
            "dataset_version": listing["dataset_version_id"],
            "listing_id": listing["id"],
            "title": "Arithmetic drills",
            "terms": "Training only; no redistribution.",
        }
    ]
    raw = response.content.decode()
    for row in ROWS.decode().splitlines()[:5]:
        assert json.loads(row)["prompt"] not in raw
    assert partner.organization.pk not in raw
    assert "MathData" not in raw
    assert "dana" not in raw
    assert "file-" not in raw  # none of the partner's source files
    markdown = card(alice, model_id, HTTP_ACCEPT="text/markdown").content.decode()
    assert "Arithmetic drills" in markdown
    assert "Training only; no redistribution." in markdown
    assert "What is" not in markdown


def test_a_compressed_models_card_has_the_method_report_and_source_lineage(
    alice: Person, django_capture_on_commit_callbacks: Any
) -> None:
    captured = django_capture_on_commit_callbacks
    training = upload(alice, chat_rows(30), captured)
    _, source_id = fine_tune(alice, captured, training_file=training, suffix="src")
    source = CustomerModel.objects.for_organization(alice.organization).get(pk=source_id)
    report = {
        "method": "quantize",
        "quality_metric": "perplexity",
        "source": {"file_bytes": 4000, "quality": 12.5},
        "result": {"file_bytes": 1000, "quality": 12.9},
    }
    job = Job.objects.create(
        id=new_compression_job_id(),
        kind="compression",
        organization=alice.organization,
        base_model=source.base,
        source_model=source,
        method="quantize",
        task="causal_lm",
        seed=1,
        hyperparameters={"weights": "int8"},
        status="succeeded",
        report=report,
        created_by=alice.user,
    )
    compressed = customer_model_register(
        organization=alice.organization,
        base=source.base,
        job_id=job.pk,
        suffix="src",
        kind="compressed",
        step=None,
        uri="file:///nonexistent/compressed",
        artifact_kind="full",
        task="causal_lm",
        labels=[],
        compression={"method": "quantize", "source": source_id, "weights": "int8"},
    )

    body = card(alice, compressed.pk).json()

    assert (body["kind"], body["method"], body["adapter"]) == ("compressed", "quantize", None)
    assert body["hyperparameters"] == {"weights": "int8"}
    assert body["compression"] == report
    assert body["source_model"]["id"] == source_id
    assert body["source_model"]["method"] == "lora"
    assert body["source_model"]["training_data"]["files"][0]["id"] == training
    markdown = card(alice, compressed.pk, HTTP_ACCEPT="text/markdown").content.decode()
    assert "| file_bytes | 4000 | 1000 |" in markdown


def test_the_owner_sets_intended_use_and_limitations_audited_and_in_markdown(
    alice: Person, django_capture_on_commit_callbacks: Any
) -> None:
    _, model_id = fine_tune(
        alice,
        django_capture_on_commit_callbacks,
        training_file=upload(alice, chat_rows(10), django_capture_on_commit_callbacks),
    )
    text = {"intended_use": "Answering order-status questions.", "limitations": "English only."}

    response = alice.client.patch(f"/v1/models/{model_id}/card", text, format="json")

    assert response.status_code == 200, response.content
    assert response.json()["intended_use"] == text["intended_use"]
    assert card(alice, model_id).json()["limitations"] == "English only."
    (entry,) = AuditLog.objects.for_organization(alice.organization).filter(
        action="model.card_updated"
    )
    assert entry.details == {"model_id": model_id, "fields": ["intended_use", "limitations"]}
    assert entry.actor_email == "alice@acme.test"
    markdown = card(alice, model_id, HTTP_ACCEPT="text/markdown")
    assert markdown.status_code == 200
    assert markdown["Content-Type"].startswith("text/markdown")
    doc = markdown.content.decode()
    assert doc.startswith(f"# Model card: {model_id}")
    assert "## Intended use\n\nAnswering order-status questions." in doc
    assert "## Limitations\n\nEnglish only." in doc
    assert "| valid_loss | 0.75 |" in doc


def test_card_text_takes_an_owner_or_admin_and_a_valid_length(
    alice: Person, bob: Person, django_capture_on_commit_callbacks: Any
) -> None:
    _, model_id = fine_tune(
        alice,
        django_capture_on_commit_callbacks,
        training_file=upload(alice, chat_rows(10), django_capture_on_commit_callbacks),
    )
    url = f"/v1/models/{model_id}/card"

    as_developer = bob.client.patch(url, {"intended_use": "x"}, format="json")
    too_long = alice.client.patch(url, {"limitations": "x" * (CARD_TEXT_MAX + 1)}, format="json")
    not_text = alice.client.patch(url, {"intended_use": ["a"]}, format="json")
    unknown = alice.client.patch(url, {"owner": "me"}, format="json")
    empty = alice.client.patch(url, {}, format="json")
    on_base = alice.client.patch(
        f"/v1/models/{TINY_LLAMA}/card", {"limitations": "x"}, format="json"
    )

    assert as_developer.status_code == 403
    assert as_developer.json()["error"]["code"] == "insufficient_role"
    assert too_long.status_code == 400
    assert too_long.json()["error"]["param"] == "limitations"
    assert not_text.status_code == 400
    assert unknown.status_code == 400
    assert empty.status_code == 400
    assert on_base.status_code == 403
    assert on_base.json()["error"]["code"] == "cannot_modify_base_model"
    model = CustomerModel.objects.for_organization(alice.organization).get(pk=model_id)
    assert (model.intended_use, model.limitations) == ("", "")
    assert not AuditLog.objects.for_organization(alice.organization).filter(
        action="model.card_updated"
    )

    admin = join(alice.organization, "adam@acme.test", "admin")
    assert admin.client.patch(url, {"intended_use": "ok"}, format="json").status_code == 200


def test_a_base_models_card_comes_from_the_catalogue(alice: Person) -> None:
    register_tiny_llama(real=False)

    body = card(alice, TINY_LLAMA).json()

    assert (body["id"], body["kind"], body["owned_by"]) == (TINY_LLAMA, "base", "atelier")
    assert body["base_model"]["context_length"] == 256
    assert body["supported"]["methods"] == ["supervised", "dpo"]
    assert body["job"] is None
    assert body["training_data"]["files"] == []
    assert body["created_by"] == {"name": "Atelier"}


def test_unknown_foreign_malformed_and_anonymous_requests_are_refused(
    alice: Person, charlie: Person, django_capture_on_commit_callbacks: Any
) -> None:
    _, model_id = fine_tune(
        alice,
        django_capture_on_commit_callbacks,
        training_file=upload(alice, chat_rows(10), django_capture_on_commit_callbacks),
    )

    foreign = card(charlie, model_id)
    foreign_patch = charlie.client.patch(
        f"/v1/models/{model_id}/card", {"intended_use": "mine"}, format="json"
    )
    unknown = card(alice, model_id + "x")
    malformed = card(alice, "ft:bad id!")
    anonymous = client_with(None).get(f"/v1/models/{model_id}/card")
    not_acceptable = card(alice, model_id, HTTP_ACCEPT="text/html")
    markdown_404 = card(charlie, model_id, HTTP_ACCEPT="text/markdown")

    for response in (foreign, foreign_patch, unknown, malformed):
        assert response.status_code == 404, response.content
        assert response.json()["error"]["code"] == "model_not_found"
    assert anonymous.status_code == 401
    assert not_acceptable.status_code == 406
    assert markdown_404.status_code == 404
    assert markdown_404.json()["error"]["code"] == "model_not_found"  # errors stay JSON
    model = CustomerModel.objects.for_organization(alice.organization).get(pk=model_id)
    assert model.intended_use == ""


def test_the_creator_is_shown_only_while_a_member_of_the_organization(
    alice: Person, django_capture_on_commit_callbacks: Any
) -> None:
    bob_admin = join(alice.organization, "bob.admin@acme.test", "admin")
    bob_admin.user.name = "Bob Builder"
    bob_admin.user.save(update_fields=["name"])
    captured = django_capture_on_commit_callbacks
    _, model_id = fine_tune(
        bob_admin, captured, training_file=upload(bob_admin, chat_rows(10), captured)
    )
    assert card(alice, model_id).json()["created_by"] == {"name": "Bob Builder"}

    bob_admin.membership.delete()

    assert card(alice, model_id).json()["created_by"] == {"name": "A former member"}
    assert "bob.admin" not in card(alice, model_id).content.decode()


def test_markdown_renders_any_card_text_without_breaking_tables(alice: Person) -> None:
    from controlplane.modelregistry.cards import card_markdown

    doc = card_markdown(
        {
            "id": "m",
            "hyperparameters": {"note": "a | b\nc"},
            "metrics": {"validation": {"valid_loss": 1.0}, "test": None},
        }
    )
    assert "| note | a \\| b c |" in doc
    assert io.StringIO(doc).readline() == "# Model card: m\n"
