"""The official `openai` SDK drives fine-tuning jobs unchanged."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import openai
import pytest

from jobcontracts import training as contract
from tests.support.jobs import TINY_LLAMA, Worker, chat_rows, register_tiny_llama
from tests.support.people import Person
from tests.support.sdk import in_process_sdk

pytestmark = pytest.mark.django_db


@pytest.fixture
def sdk(alice: Person) -> Iterator[openai.OpenAI]:
    register_tiny_llama()
    with in_process_sdk(alice.key) as client:
        yield client


def test_the_openai_sdk_creates_lists_retrieves_cancels_and_reads_events(
    sdk: openai.OpenAI, django_capture_on_commit_callbacks: Any
) -> None:
    with django_capture_on_commit_callbacks(execute=True):
        training = sdk.files.create(file=("train.jsonl", chat_rows(12)), purpose="fine-tune")
    with django_capture_on_commit_callbacks(execute=True):
        job = sdk.fine_tuning.jobs.create(
            model=TINY_LLAMA,
            training_file=training.id,
            suffix="sdk",
            seed=3,
            method={
                "type": "supervised",
                "supervised": {"hyperparameters": {"n_epochs": 1, "batch_size": 4}},
            },
            metadata={"team": "support"},
        )
    assert job.id.startswith("ftjob-")
    assert job.model == TINY_LLAMA
    assert job.training_file == training.id
    assert job.metadata == {"team": "support"}

    worker = Worker(job.id, 1)
    worker.report(contract.STARTED, total_steps=3)
    worker.report(contract.PROGRESS, step=1, total_steps=3, train_loss=1.5)
    worker.report(
        contract.CHECKPOINT,
        step=1,
        uri=worker.uri("checkpoints", "c1"),
        metrics={"train_loss": 1.5},
    )

    got = sdk.fine_tuning.jobs.retrieve(job.id)
    assert got.status == "running"
    assert got.hyperparameters.n_epochs == 1
    assert got.hyperparameters.batch_size == 4
    assert [j.id for j in sdk.fine_tuning.jobs.list(limit=10)] == [job.id]
    events = list(sdk.fine_tuning.jobs.list_events(job.id, limit=50))
    assert any(e.type == "metrics" and e.data["train_loss"] == 1.5 for e in events)
    (checkpoint,) = sdk.fine_tuning.jobs.checkpoints.list(job.id).data
    assert checkpoint.step_number == 1
    assert checkpoint.metrics.train_loss == 1.5
    assert checkpoint.fine_tuned_model_checkpoint.endswith(":ckpt-step-1")

    with django_capture_on_commit_callbacks(execute=True):
        cancelled = sdk.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status == "cancelled"
    with pytest.raises(openai.ConflictError):
        sdk.fine_tuning.jobs.cancel(job.id)
    with pytest.raises(openai.NotFoundError):
        sdk.fine_tuning.jobs.retrieve("ftjob-missing")
