"""Jobs on real processes: control worker, GPU worker, Redis broker, a real SIGKILL.

The API runs in-process (committed transactions, so the worker processes see
the rows); reports travel GPU worker → Redis → control worker → PostgreSQL.
The reaper is called here the way beat calls it (every few seconds).
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from controlplane.jobs import dispatch
from controlplane.jobs.models import Job, JobStatus
from tests.support.jobs import TINY_LLAMA, chat_rows, register_tiny_llama
from tests.support.people import Person
from tests.support.plans import set_plan
from tests.support.processes import worker

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

LEASE = "4"
ENV = {
    "JOBS_LEASE_SECONDS": LEASE,
    "JOBS_HEARTBEAT_SECONDS": "1",
    "JOBS_CHECKPOINT_EVERY_STEPS": "4",
    "JOBS_CHECKPOINT_EVERY_SECONDS": "0",
    "OMP_NUM_THREADS": "1",
}


@pytest.fixture
def jobs_env(settings: Any) -> None:
    settings.JOBS_LEASE_SECONDS = float(LEASE)
    settings.JOBS_HEARTBEAT_SECONDS = 1.0
    settings.JOBS_CHECKPOINT_EVERY_STEPS = 4
    settings.JOBS_CHECKPOINT_EVERY_SECONDS = 0.0
    set_plan("free", concurrent_fine_tuning_jobs=4)
    register_tiny_llama()


def upload(person: Person, rows: int) -> str:
    import io

    f = io.BytesIO(chat_rows(rows))
    f.name = "train.jsonl"
    response = person.client.post(
        "/v1/files", {"file": f, "purpose": "fine-tune"}, format="multipart"
    )
    assert response.status_code == 200, response.content
    return str(response.json()["id"])


def submit(person: Person, file_id: str, *, epochs: int = 2, batch: int = 2) -> str:
    response = person.client.post(
        "/v1/fine_tuning/jobs",
        {
            "model": TINY_LLAMA,
            "training_file": file_id,
            "seed": 11,
            "method": {
                "type": "supervised",
                "supervised": {"hyperparameters": {"n_epochs": epochs, "batch_size": batch}},
            },
        },
        format="json",
    )
    assert response.status_code == 200, response.content
    return str(response.json()["id"])


def job(job_id: str) -> Job:
    return Job.objects.dangerously_unscoped().get(pk=job_id)


def wait_for(
    check: Callable[[], bool], what: str, timeout: float = 120, reap: bool = False
) -> float:
    """Seconds until `check()` holds; calls the reaper as beat would when `reap`."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if check():
            return time.monotonic() - start
        if reap:
            dispatch.reap()
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}")


def wait_processed(person: Person, file_id: str) -> None:
    wait_for(
        lambda: person.client.get(f"/v1/files/{file_id}").json()["status"] == "processed",
        "file validation",
    )


def kill_tree(pid: int) -> None:
    """SIGKILL a worker and its pool children, by pid (never by name)."""
    children: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        children.extend(int(c) for c in text)
    os.kill(pid, signal.SIGKILL)
    for child in children:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)


def events(person: Person, job_id: str) -> list[dict[str, Any]]:
    return person.client.get(f"/v1/fine_tuning/jobs/{job_id}/events?limit=100").json()["data"]  # type: ignore[no-any-return]


def test_a_killed_worker_is_noticed_and_the_job_resumes_from_its_checkpoint(
    alice: Person, jobs_env: None, tmp_path: Path
) -> None:
    with worker("control", tmp_path, **ENV):
        file_id = upload(alice, 24)
        wait_processed(alice, file_id)
        with worker("gpu", tmp_path / "gpu1", **ENV) as first:
            reference = submit(alice, file_id)
            wait_for(lambda: job(reference).status == JobStatus.SUCCEEDED, "reference run")
            victim = submit(alice, file_id)
            wait_for(lambda: job(victim).last_checkpoint_step >= 4, "a checkpoint")
            kill_tree(first.pid)
        lost_after = wait_for(
            lambda: job(victim).attempt == 2, "the lease to expire", timeout=60, reap=True
        )
        with worker("gpu", tmp_path / "gpu2", **ENV):
            wait_for(lambda: job(victim).status == JobStatus.SUCCEEDED, "the retry", reap=True)

    done, ref = job(victim), job(reference)
    assert lost_after < float(LEASE) + 10
    assert done.lost_attempts == 1
    assert done.current_step == ref.current_step == ref.total_steps
    assert done.trained_tokens == ref.trained_tokens  # billed once, for the same work
    messages = [e["message"] for e in events(alice, victim)]
    assert any("stopped reporting" in m and "retrying from step" in m for m in messages)
    assert any("resuming from step" in m for m in messages)
    assert done.fine_tuned_model


def test_pause_resume_and_cancel_reach_a_real_worker_within_seconds(
    alice: Person, jobs_env: None, tmp_path: Path
) -> None:
    with worker("control", tmp_path, **ENV), worker("gpu", tmp_path / "gpu", **ENV):
        file_id = upload(alice, 60)
        wait_processed(alice, file_id)
        job_id = submit(alice, file_id, epochs=6, batch=1)
        url = f"/v1/fine_tuning/jobs/{job_id}"
        wait_for(lambda: job(job_id).current_step >= 3, "training steps")

        assert alice.client.post(f"{url}/pause").json()["status"] == "paused"
        paused_in = wait_for(lambda: job(job_id).dispatched_at is None, "the pause checkpoint")
        paused_at = job(job_id).last_checkpoint_step
        assert paused_at >= 3

        assert alice.client.post(f"{url}/resume").json()["status"] == "queued"
        wait_for(lambda: job(job_id).current_step > paused_at, "training to go on")
        assert job(job_id).attempt == 2

        assert alice.client.post(f"{url}/cancel").json()["status"] == "cancelled"
        cancelled_in = wait_for(
            lambda: any(
                "cancelled" in e["message"] and e["message"].startswith("Training")
                for e in events(alice, job_id)
            ),
            "the worker to stop",
        )

    assert paused_in < 5
    assert cancelled_in < 5
    messages = [e["message"] for e in events(alice, job_id)]
    assert any(f"resuming from step {paused_at}" in m for m in messages)
