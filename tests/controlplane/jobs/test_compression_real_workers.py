"""Compression jobs on real processes: control worker, GPU worker, Redis, a real SIGKILL.

The same machinery as fine-tuning (test_real_workers.py): a GPU worker killed by pid
mid-job loses its lease, the job is re-dispatched as attempt 2 (from the start: a
compression attempt has no checkpoints), the old attempt is fenced, and the job is
billed once; a cancel reaches the running worker, which stops without a model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from controlplane.billing.models import LedgerEntry, Meter
from controlplane.jobs.models import JobStatus
from controlplane.modelregistry.models import CustomerModel
from tests.support.jobs import TINY_LLAMA
from tests.support.people import Person
from tests.support.processes import worker

from .test_real_workers import ENV, job, jobs_env, kill_tree, upload, wait_for, wait_processed

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]
__all__ = ["jobs_env"]


def submit(person: Person, file_id: str, *, steps: int) -> str:
    response = person.client.post(
        "/v1/compression/jobs",
        {
            "model": TINY_LLAMA,
            "method": "prune",
            "options": {"sparsity": 0.3, "recovery_steps": steps, "batch_size": 2},
            "training_file": file_id,
            "validation_file": file_id,
            "seed": 5,
        },
        format="json",
    )
    assert response.status_code == 200, response.content
    return str(response.json()["id"])


def events(person: Person, job_id: str) -> list[str]:
    data = person.client.get(f"/v1/compression/jobs/{job_id}/events?limit=100").json()["data"]
    return [str(e["message"]) for e in data]


def charges(person: Person) -> list[Any]:
    return list(
        LedgerEntry.objects.for_organization(person.organization)
        .filter(meter=Meter.COMPRESSION_JOB)
        .values_list("reference", flat=True)
    )


def test_a_killed_compression_worker_is_redispatched_and_the_job_billed_once(
    alice: Person, jobs_env: None, tmp_path: Path
) -> None:
    with worker("control", tmp_path, **ENV):
        file_id = upload(alice, 24)
        wait_processed(alice, file_id)
        with worker("gpu", tmp_path / "gpu1", **ENV) as first:
            victim = submit(alice, file_id, steps=400)
            wait_for(lambda: job(victim).current_step >= 3, "recovery steps", timeout=180)
            kill_tree(first.pid)
        lost_after = wait_for(
            lambda: job(victim).attempt == 2, "the lease to expire", timeout=60, reap=True
        )
        with worker("gpu", tmp_path / "gpu2", **ENV):
            wait_for(
                lambda: job(victim).status == JobStatus.SUCCEEDED,
                "the retry",
                timeout=300,
                reap=True,
            )

    done = job(victim)
    assert lost_after < 4 + 10
    assert done.lost_attempts == 1, events(alice, victim)
    assert done.current_step == 400
    assert charges(alice) == [victim]
    messages = events(alice, victim)
    assert any("stopped reporting" in m and "retrying from the start" in m for m in messages), (
        messages
    )
    model = CustomerModel.objects.for_organization(alice.organization).get(pk=done.fine_tuned_model)
    assert model.kind == "compressed"
    report = alice.client.get(f"/v1/compression/jobs/{victim}/report").json()
    source, result = report["source"], report["result"]
    assert result["parameters"] < source["parameters"]
    assert result["file_bytes"] < source["file_bytes"]
    for measures in (source, result):
        for name in (
            "peak_memory_bytes",
            "latency_ms_p50_batch1",
            "latency_ms_p50_batch16",
            "quality",
        ):
            assert measures[name] is not None, (name, measures)
            assert measures[name] > 0, (name, measures)
    assert report["quality_metric"] == "perplexity"


def test_a_cancel_reaches_the_running_compression_worker(
    alice: Person, jobs_env: None, tmp_path: Path
) -> None:
    with worker("control", tmp_path, **ENV):
        file_id = upload(alice, 24)
        wait_processed(alice, file_id)
        with worker("gpu", tmp_path / "gpu", **ENV):
            job_id = submit(alice, file_id, steps=2000)
            wait_for(lambda: job(job_id).current_step >= 2, "recovery steps", timeout=180)
            response = alice.client.post(f"/v1/compression/jobs/{job_id}/cancel")
            assert response.status_code == 200, response.content
            wait_for(
                lambda: any("Compression stopped" in m for m in events(alice, job_id)),
                "the worker to stop",
                timeout=60,
            )
    stopped = job(job_id)
    assert stopped.status == JobStatus.CANCELLED
    assert stopped.current_step < 2000
    assert stopped.fine_tuned_model == ""
    assert not CustomerModel.objects.for_organization(alice.organization).exists()
    assert charges(alice) == []
