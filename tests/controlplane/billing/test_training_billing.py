"""A fine-tuning job's trained tokens reach the ledger once, from its success report."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from controlplane.billing.models import LedgerEntry, Meter
from controlplane.jobs.models import Job
from jobcontracts import training as contract
from tests.support.jobs import (
    TINY_LLAMA,
    Worker,
    chat_rows,
    create_job,
    purge_broker,
    register_tiny_llama,
    upload_file,
)
from tests.support.people import Person

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def _empty_job_queues() -> Iterator[None]:
    purge_broker()
    yield
    purge_broker()


def test_a_succeeded_job_bills_its_trained_tokens_once(
    alice: Person, django_capture_on_commit_callbacks: Any
) -> None:
    captured = django_capture_on_commit_callbacks
    register_tiny_llama(real=True)
    file_id = upload_file(alice, chat_rows(10), captured)
    response = create_job(alice, captured, model=TINY_LLAMA, training_file=file_id)
    assert response.status_code == 200, response.content
    job_id = response.json()["id"]
    attempt = Job.objects.dangerously_unscoped().get(pk=job_id).attempt
    worker = Worker(job_id, attempt)
    with captured(execute=True):
        worker.report(contract.STARTED, total_steps=1)
        worker.report(
            contract.SUCCEEDED, step=1, trained_tokens=1234, artifact_uri=worker.uri("final")
        )
        worker.seq -= 1  # the same success report delivered again
        worker.report(
            contract.SUCCEEDED, step=1, trained_tokens=1234, artifact_uri=worker.uri("final")
        )

    rows = list(
        LedgerEntry.objects.for_organization(alice.organization).filter(meter=Meter.TRAINING_TOKENS)
    )
    assert [(e.quantity, e.model, e.reference, e.source) for e in rows] == [
        (1234, TINY_LLAMA, job_id, "jobs.training")
    ]
