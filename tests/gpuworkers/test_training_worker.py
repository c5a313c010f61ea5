"""A real `celery -A gpuworkers.celery worker -Q gpu.training` process, reached through
Redis by task name; its reports are read off the `control` queue as the control
plane's worker would receive them."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from kombu import Exchange, Queue

from jobcontracts import queues
from jobcontracts.broker import celery_config
from jobcontracts.training import FINAL_KINDS, Report
from tests.gpuworkers.helpers import final_dir, make_spec
from tests.support.processes import stop

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
#: Submit-to-first-step target for a warm worker (the engine is pre-imported).
FIRST_STEP_TARGET_SECONDS = float(os.environ.get("TRAINING_FIRST_STEP_TARGET_SECONDS", "3"))


@pytest.fixture(scope="module")
def client() -> Celery:
    app = Celery("gpuworkers-test-client", fixups=[])
    app.conf.update(celery_config())
    return app


@pytest.fixture(scope="module")
def training_worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    log = tmp_path_factory.mktemp("worker") / "worker.log"
    env = dict(os.environ)
    env.pop("DJANGO_SETTINGS_MODULE", None)
    env.update(PYTHONPATH=str(ROOT / "workers"), PYTHONUNBUFFERED="1")
    name = f"training-test-{uuid.uuid4().hex[:8]}@%h"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                str(BIN / "celery"),
                *("-A", "gpuworkers.celery", "worker", "-Q", queues.GPU_TRAINING, "-n", name),
                *("--concurrency", "1", "--loglevel", "INFO"),
                *("--without-gossip", "--without-mingle", "--without-heartbeat"),
            ],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
    try:
        # Ready once the pool process has pre-imported torch, transformers and peft.
        deadline = time.monotonic() + 120
        while "training.preloaded" not in log.read_text(errors="replace"):
            assert process.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        yield log
    finally:
        stop(process)


def _reports(client: Celery, job_id: str, timeout: float = 120) -> list[Report]:
    """Reports of `job_id` from the `control` queue, up to and including a final one."""
    found: list[Report] = []
    queue = Queue(queues.CONTROL, Exchange(queues.CONTROL), routing_key=queues.CONTROL)
    deadline = time.monotonic() + timeout
    with client.connection_for_read() as connection, connection.SimpleQueue(queue) as control:
        while time.monotonic() < deadline:
            try:
                message = control.get(timeout=1)
            except control.Empty:
                continue
            message.ack()
            if message.headers.get("task") != queues.CONTROL_JOB_REPORT:
                continue
            args, _kwargs, _embed = message.decode()
            report = Report.from_json(args[0])
            if report.job_id != job_id:
                continue
            found.append(report)
            if report.kind in FINAL_KINDS:
                return found
    raise AssertionError(f"no final report for {job_id} in {timeout}s: {found}")


def test_worker_runs_a_job_sent_by_name_and_reports_to_the_control_queue(
    training_worker: Path, client: Celery, tmp_path: Path
) -> None:
    job_id = f"ftjob-{uuid.uuid4().hex[:12]}"
    spec = make_spec(tmp_path, job_id=job_id, repeat=2, n_epochs=2, checkpoint_every_steps=2)

    submitted = time.time()
    client.send_task(queues.TRAIN, args=[spec.to_json()], queue=queues.GPU_TRAINING)
    reports = _reports(client, job_id)

    kinds = [r.kind for r in reports]
    assert [r.seq for r in reports] == list(range(len(reports)))
    assert kinds[-1] == "succeeded", reports[-1].data
    assert kinds.index("started") < kinds.index("progress") < kinds.index("checkpoint")
    assert reports[-1].data["step"] == 6
    assert (final_dir(spec) / "adapter_model.safetensors").exists()
    first_step = next(r for r in reports if r.kind == "progress").at - submitted
    print(f"submit-to-first-step: {first_step:.2f}s")  # shown with pytest -s
    assert first_step < FIRST_STEP_TARGET_SECONDS, training_worker.read_text()[-2000:]


def test_worker_reports_an_invalid_spec_instead_of_crashing(
    training_worker: Path, client: Celery
) -> None:
    job_id = f"ftjob-{uuid.uuid4().hex[:12]}"
    bad: dict[str, Any] = {"job_id": job_id, "attempt": 1, "task": "summarize"}

    client.send_task(queues.TRAIN, args=[bad], queue=queues.GPU_TRAINING)
    reports = _reports(client, job_id, timeout=60)

    assert [r.kind for r in reports] == ["failed"]
    assert reports[0].seq == 0
    assert reports[0].data["code"] == "invalid_spec"
    assert reports[0].data["retryable"] is False


def test_a_busy_worker_leaves_the_next_job_queued_and_cancel_frees_it(
    training_worker: Path, client: Celery, tmp_path: Path
) -> None:
    import redis

    from gpuworkers import storage
    from jobcontracts.training import Signal

    long_id, next_id = (f"ftjob-{uuid.uuid4().hex[:12]}" for _ in range(2))
    long_job = make_spec(
        tmp_path / "long",
        job_id=long_id,
        repeat=100,
        n_epochs=50,
        batch_size=1,
        control_poll_seconds=0.2,
    )
    next_job = make_spec(tmp_path / "next", job_id=next_id, n_epochs=1)
    broker = redis.Redis.from_url(os.environ["REDIS_URL"])
    queued_before = broker.llen(queues.GPU_TRAINING)

    client.send_task(queues.TRAIN, args=[long_job.to_json()], queue=queues.GPU_TRAINING)
    try:
        _wait_for(client, long_id, "progress")
        client.send_task(queues.TRAIN, args=[next_job.to_json()], queue=queues.GPU_TRAINING)
        time.sleep(1.5)
        # Still in Redis, free for any idle GPU worker: not reserved by the busy one.
        assert broker.llen(queues.GPU_TRAINING) == queued_before + 1
    finally:
        cancelled_at = time.time()
        storage.write_bytes(long_job.control_uri, Signal(1, "cancel").to_bytes())
    long_reports = _reports(client, long_id, timeout=60)
    assert long_reports[-1].kind == "cancelled"
    assert long_reports[-1].at - cancelled_at < 2.0  # within a few steps of the signal
    assert _reports(client, next_id, timeout=60)[-1].kind == "succeeded"


def _wait_for(client: Celery, job_id: str, kind: str, timeout: float = 60) -> None:
    queue = Queue(queues.CONTROL, Exchange(queues.CONTROL), routing_key=queues.CONTROL)
    deadline = time.monotonic() + timeout
    with client.connection_for_read() as connection, connection.SimpleQueue(queue) as control:
        while time.monotonic() < deadline:
            try:
                message = control.get(timeout=1)
            except control.Empty:
                continue
            message.ack()
            report = Report.from_json(message.decode()[0][0])
            if report.job_id == job_id and report.kind == kind:
                return
    raise AssertionError(f"no {kind} report for {job_id}")
