"""Fine-tuning jobs: creation, pricing, dispatch, reports, leases, cancel/pause/resume."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from django.utils import timezone

from controlplane.jobs import dispatch
from controlplane.jobs.models import Job
from jobcontracts import training as contract
from tests.support.jobs import (
    TINY_LLAMA,
    Worker,
    chat_rows,
    create_job,
    purge_broker,
    register_tiny_llama,
    sent_specs,
    upload_file,
)
from tests.support.people import Person

pytestmark = pytest.mark.django_db


@pytest.fixture
def base(db: None) -> Any:
    return register_tiny_llama()


@pytest.fixture
def chat_file(alice: Person, base: Any, django_capture_on_commit_callbacks: Any) -> str:
    return upload_file(alice, chat_rows(40), django_capture_on_commit_callbacks)


def job_of(person: Person, job_id: str) -> dict[str, Any]:
    response = person.client.get(f"/v1/fine_tuning/jobs/{job_id}")
    assert response.status_code == 200, response.content
    return response.json()  # type: ignore[no-any-return]


def test_a_job_is_priced_before_it_starts_and_sent_to_a_gpu_worker(
    alice: Person, chat_file: str, django_capture_on_commit_callbacks: Any
) -> None:
    response = create_job(
        alice,
        django_capture_on_commit_callbacks,
        model=TINY_LLAMA,
        training_file=chat_file,
        suffix="support",
        seed=7,
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2}}},
    )
    assert response.status_code == 200, response.content
    created = response.json()
    assert created["object"] == "fine_tuning.job"
    assert created["id"].startswith("ftjob-")
    assert created["status"] == "validating_files"  # as returned by the create call

    job = job_of(alice, created["id"])
    assert job["status"] == "queued"
    assert job["hyperparameters"] == {
        "n_epochs": 2,
        "batch_size": 1,  # auto: 0.2% of 40 rows, at least 1
        "learning_rate_multiplier": 1.0,
        "group_by_length": True,
        "packing": False,
    }
    estimate = job["estimate"]
    assert estimate["training_tokens_per_epoch"] > 40 * 10
    assert estimate["total_training_tokens"] == 2 * estimate["training_tokens_per_epoch"]
    price = estimate["total_training_tokens"] / 1000 * 0.008
    assert abs(float(estimate["price"]) - price) < 1e-6
    assert job["attempt"] == 1

    (spec,) = sent_specs()
    assert spec.job_id == created["id"]
    assert spec.attempt == 1
    assert spec.base_model.name == TINY_LLAMA
    assert spec.training_data.format == "chat"
    assert spec.training_data.uri.startswith("file:///")
    assert spec.hyperparameters.n_epochs == 2
    assert spec.hyperparameters.seed == 7
    assert spec.adapter is not None  # LoRA unless asked for a full fine-tune
    assert spec.resume_from is None
    events = alice.client.get(f"/v1/fine_tuning/jobs/{created['id']}/events").json()["data"]
    assert any("estimated price" in e["message"] for e in events)


def run_to_success(job_id: str, attempt: int = 1, steps: int = 4) -> Worker:
    worker = Worker(job_id, attempt)
    worker.report(contract.STARTED, total_steps=steps, resumed_from_step=0, device="cpu")
    for step in range(1, steps + 1):
        worker.report(
            contract.PROGRESS,
            step=step,
            total_steps=steps,
            train_loss=2.0 / step,
            trained_tokens=step * 10,
        )
    worker.report(
        contract.CHECKPOINT,
        step=2,
        uri=worker.uri("checkpoints", "step-2"),
        metrics={"train_loss": 1.0},
    )
    worker.report(
        contract.SUCCEEDED,
        step=steps,
        trained_tokens=steps * 10,
        artifact_uri=worker.uri("final"),
        artifact_kind="lora",
        artifact_files=["adapter_model.safetensors"],
    )
    return worker


def test_reports_move_the_job_to_succeeded_with_a_model_and_checkpoints(
    alice: Person, chat_file: str, django_capture_on_commit_callbacks: Any
) -> None:
    job_id = create_job(
        alice,
        django_capture_on_commit_callbacks,
        model=TINY_LLAMA,
        training_file=chat_file,
        suffix="s1",
    ).json()["id"]
    with django_capture_on_commit_callbacks(execute=True):
        run_to_success(job_id)

    job = job_of(alice, job_id)
    assert job["status"] == "succeeded"
    assert job["trained_tokens"] == 40
    assert job["fine_tuned_model"].startswith(f"ft:{TINY_LLAMA}:")
    assert job["fine_tuned_model"].endswith(f":s1:{job_id}")
    assert job["finished_at"] is not None
    (checkpoint,) = alice.client.get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints").json()["data"]
    assert checkpoint["step_number"] == 2
    assert checkpoint["metrics"]["train_loss"] == 1.0
    assert checkpoint["fine_tuned_model_checkpoint"].endswith(":ckpt-step-2")
    models = {m["id"] for m in alice.client.get("/v1/models").json()["data"]}
    assert job["fine_tuned_model"] in models
    assert checkpoint["fine_tuned_model_checkpoint"] in models
    metrics = [
        e
        for e in alice.client.get(f"/v1/fine_tuning/jobs/{job_id}/events?limit=100").json()["data"]
        if e["type"] == "metrics"
    ]
    assert len(metrics) == 4
    assert metrics[0]["data"]["step"] == 4  # newest first


def test_the_same_report_applied_three_times_counts_once(
    alice: Person, chat_file: str, django_capture_on_commit_callbacks: Any
) -> None:
    from controlplane.jobs.reports import report_apply

    job_id = create_job(
        alice, django_capture_on_commit_callbacks, model=TINY_LLAMA, training_file=chat_file
    ).json()["id"]
    report = contract.Report(job_id, 1, 0, contract.PROGRESS, 1.7e9, {"step": 1, "total_steps": 9})
    outcomes = [report_apply(report.to_json()) for _ in range(3)]

    assert outcomes == ["applied", "duplicate", "duplicate"]
    events = alice.client.get(f"/v1/fine_tuning/jobs/{job_id}/events?limit=100").json()["data"]
    assert sum(e["type"] == "metrics" for e in events) == 1


def test_trained_tokens_are_recorded_once_even_if_a_late_attempt_succeeds_again(
    alice: Person, chat_file: str, django_capture_on_commit_callbacks: Any
) -> None:
    job_id = create_job(
        alice, django_capture_on_commit_callbacks, model=TINY_LLAMA, training_file=chat_file
    ).json()["id"]
    with django_capture_on_commit_callbacks(execute=True):
        run_to_success(job_id)
        late = Worker(job_id, 1)
        late.seq = 100
        late.report(contract.SUCCEEDED, step=4, trained_tokens=999, artifact_uri=late.uri("final"))
        stale = Worker(job_id, 0)
        assert (
            stale.report(contract.SUCCEEDED, step=4, trained_tokens=999, artifact_uri="x")
            == "stale"
        )

    job = job_of(alice, job_id)
    assert job["trained_tokens"] == 40


def expire_lease(job_id: str) -> None:
    Job.objects.dangerously_unscoped().filter(pk=job_id).update(
        lease_expires_at=timezone.now() - timedelta(seconds=1)
    )


def test_a_silent_worker_loses_its_lease_and_the_job_resumes_from_its_checkpoint(
    alice: Person, chat_file: str, django_capture_on_commit_callbacks: Any
) -> None:
    job_id = create_job(
        alice, django_capture_on_commit_callbacks, model=TINY_LLAMA, training_file=chat_file
    ).json()["id"]
    first = Worker(job_id, 1)
    first.report(contract.STARTED, total_steps=10)
    first.report(contract.PROGRESS, step=3, total_steps=10)
    first.report(contract.CHECKPOINT, step=3, uri=first.uri("checkpoints", "step-3"), metrics={})
    assert job_of(alice, job_id)["status"] == "running"
    purge_broker()

    expire_lease(job_id)
    with django_capture_on_commit_callbacks(execute=True):
        outcome = dispatch.reap()

    assert outcome["lost"] == 1
    job = job_of(alice, job_id)
    assert job["status"] == "queued"
    assert job["attempt"] == 2
    (spec,) = sent_specs()
    assert spec.attempt == 2
    assert spec.resume_from == first.uri("checkpoints", "step-3")
    # The old worker, should it still be alive, is fenced out.
    assert first.report(contract.PROGRESS, step=4, total_steps=10) == "stale"
    events = alice.client.get(f"/v1/fine_tuning/jobs/{job_id}/events?limit=100").json()["data"]
    assert any("retrying from step 3" in e["message"] for e in events)


def test_a_job_fails_clearly_after_too_many_lost_attempts(
    alice: Person, chat_file: str, django_capture_on_commit_callbacks: Any, settings: Any
) -> None:
    settings.JOBS_MAX_ATTEMPTS = 2
    job_id = create_job(
        alice, django_capture_on_commit_callbacks, model=TINY_LLAMA, training_file=chat_file
    ).json()["id"]
    for attempt in (1, 2):
        Worker(job_id, attempt).report(contract.STARTED, total_steps=10)
        expire_lease(job_id)
        with django_capture_on_commit_callbacks(execute=True):
            dispatch.reap()

    job = job_of(alice, job_id)
    assert job["status"] == "failed"
    assert job["error"]["code"] == "worker_lost"
    assert "retried 2 times" in job["error"]["message"]


def test_a_user_data_error_fails_at_once_and_an_unexpected_one_is_retried(
    alice: Person, chat_file: str, django_capture_on_commit_callbacks: Any
) -> None:
    retried = create_job(
        alice, django_capture_on_commit_callbacks, model=TINY_LLAMA, training_file=chat_file
    ).json()["id"]
    with django_capture_on_commit_callbacks(execute=True):
        Worker(retried, 1).report(
            contract.FAILED, code="internal", message="CUDA error", retryable=True
        )
    assert job_of(alice, retried)["attempt"] == 2

    failed = create_job(
        alice, django_capture_on_commit_callbacks, model=TINY_LLAMA, training_file=chat_file
    ).json()["id"]
    Job.objects.dangerously_unscoped().filter(pk=failed).update(attempt=1)
    Worker(failed, 1).report(
        contract.FAILED,
        code="invalid_training_file",
        message="Row 3 has no tokens.",
        retryable=False,
    )
    job = job_of(alice, failed)
    assert job["status"] == "failed"
    assert job["error"] == {
        "code": "invalid_training_file",
        "message": "Row 3 has no tokens.",
        "param": None,
    }


def test_cancel_pause_and_resume_follow_the_job_state(
    alice: Person, chat_file: str, django_capture_on_commit_callbacks: Any
) -> None:
    from django.core.files.storage import default_storage

    job_id = create_job(
        alice, django_capture_on_commit_callbacks, model=TINY_LLAMA, training_file=chat_file
    ).json()["id"]
    worker = Worker(job_id, 1)
    worker.report(contract.STARTED, total_steps=10)
    url = f"/v1/fine_tuning/jobs/{job_id}"
    assert alice.client.post(f"{url}/resume").status_code == 409

    with django_capture_on_commit_callbacks(execute=True):
        paused = alice.client.post(f"{url}/pause")
    assert paused.json()["status"] == "paused"
    signal_name = f"jobs/{alice.organization.pk}/{job_id}/control.json"
    with default_storage.open(signal_name) as f:
        assert contract.Signal.from_bytes(f.read()) == contract.Signal(1, "pause")
    pausing = alice.client.post(f"{url}/resume")
    assert pausing.status_code == 409
    assert pausing.json()["error"]["code"] == "job_pausing"

    worker.report(contract.PAUSED, step=5, checkpoint_uri=worker.uri("checkpoints", "step-5"))
    purge_broker()
    with django_capture_on_commit_callbacks(execute=True):
        resumed = alice.client.post(f"{url}/resume")
    assert resumed.status_code == 200
    (spec,) = sent_specs()
    assert (spec.attempt, spec.resume_from) == (2, worker.uri("checkpoints", "step-5"))

    with django_capture_on_commit_callbacks(execute=True):
        assert alice.client.post(f"{url}/cancel").json()["status"] == "cancelled"
    with default_storage.open(signal_name) as f:
        assert contract.Signal.from_bytes(f.read()) == contract.Signal(2, "cancel")
    again = alice.client.post(f"{url}/cancel")
    assert again.status_code == 409
    assert again.json()["error"]["code"] == "job_not_cancellable"
    assert alice.client.post(f"{url}/pause").status_code == 409
