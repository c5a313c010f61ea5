"""The batch reaper: a batch whose runner was lost is sent again, one that could not
start in its window expires; and, on real processes, a control worker SIGKILLed
mid-batch and restarted, whose batch the reaper resumes with no line answered twice."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import openai
import psycopg
import pytest
import redis
from django.conf import settings as django_settings
from django.utils import timezone

from controlplane.batches import runner, services, tasks
from controlplane.batches.models import Batch, BatchLine, BatchStatus
from controlplane.billing.models import LedgerEntry, Meter
from controlplane.celery import app
from controlplane.datasets.models import File, FileStatus
from jobcontracts import queues
from jobcontracts.inference import batch_queue
from tests.controlplane.batches.test_batches import CHAT, chat_line, llama, upload
from tests.controlplane.jobs.test_real_workers import kill_tree
from tests.support.jobs import purge_broker
from tests.support.people import Person
from tests.support.processes import asgi_server, worker
from tests.support.sdk import in_process_sdk

__all__ = ["llama"]  # the fixture, shared with test_batches


def _batch(person: Person, lines: int = 2, *, load: bool = True) -> Batch:
    with in_process_sdk(person.key) as client:
        file_id = upload(client, person, [chat_line(i) for i in range(lines)])
        created = client.batches.create(
            input_file_id=file_id, endpoint=CHAT, completion_window="24h"
        )
    batch = Batch.objects.for_organization(person.organization).get(pk=created.id)
    if load:
        assert services.batch_load_lines(batch=batch)
    return batch


def _set(batch: Batch, **fields: Any) -> None:
    Batch.objects.for_organization(batch.organization_id).filter(pk=batch.pk).update(**fields)


def _status(batch: Batch) -> str:
    return str(Batch.objects.for_organization(batch.organization_id).get(pk=batch.pk).status)


@contextmanager
def runner_elsewhere(batch_id: str) -> Iterator[None]:
    """A live runner of the batch, as the reaper sees it: its lock held by another session."""
    db = django_settings.DATABASES["default"]
    with psycopg.connect(
        host=db["HOST"], port=db["PORT"], user=db["USER"], dbname=db["NAME"], autocommit=True
    ) as other:
        other.execute("SELECT pg_advisory_lock(%s)", [runner.advisory_key(batch_id)])
        yield


def test_the_reaper_resends_runnerless_batches_and_expires_unstarted_ones(
    alice: Person, settings: Any, django_capture_on_commit_callbacks: Any
) -> None:
    settings.BATCH_RESUME_AFTER_SECONDS = 60
    old = timezone.now() - timedelta(minutes=5)
    cancelling = _batch(alice)
    _set(cancelling, status=BatchStatus.CANCELLING, created_at=old)
    past_window = _batch(alice)
    _set(past_window, created_at=old, expires_at=timezone.now() - timedelta(seconds=1))
    held = _batch(alice)
    _set(held, created_at=old)
    fresh = _batch(alice)  # its first task may still be on its way
    stuck = _batch(alice, load=False)  # its file never got validated, past its window
    File.objects.for_organization(alice.organization).filter(pk=stuck.input_file_id).update(
        status=FileStatus.PROCESSING
    )
    _set(stuck, created_at=old, expires_at=timezone.now() - timedelta(seconds=1))
    waiting = _batch(alice, load=False)  # its task waits for the validation (retrying)
    File.objects.for_organization(alice.organization).filter(pk=waiting.input_file_id).update(
        status=FileStatus.PROCESSING
    )
    _set(waiting, created_at=old)

    with runner_elsewhere(held.pk), django_capture_on_commit_callbacks(execute=True) as sent:
        assert tasks.reap_batches() == {"resumed": 2, "expired": 1}
    assert len(sent) == 2  # run_batch for the cancelling one and the one past its window
    # The resent runners ended them (the tasks run inline in tests).
    assert _status(cancelling) == BatchStatus.CANCELLED
    assert _status(past_window) == BatchStatus.EXPIRED
    expired = Batch.objects.for_organization(alice.organization).get(pk=stuck.pk)
    assert expired.status == BatchStatus.EXPIRED
    assert expired.expired_at is not None
    assert (_status(held), _status(fresh), _status(waiting)) == (
        BatchStatus.IN_PROGRESS,
        BatchStatus.IN_PROGRESS,
        BatchStatus.VALIDATING,
    )

    # Its runner gone, the held batch is sent again, once per BATCH_RESUME_AFTER_SECONDS.
    with django_capture_on_commit_callbacks() as sent:
        assert tasks.reap_batches() == {"resumed": 1, "expired": 0}
        assert tasks.reap_batches() == {"resumed": 0, "expired": 0}
    assert len(sent) == 1


def test_the_beat_schedule_runs_the_registered_reap_task(settings: Any) -> None:
    entry = settings.CELERY_BEAT_SCHEDULE["batches-reap"]
    assert entry["task"] == "controlplane.batches.reap"
    assert entry["task"] in app.tasks
    assert entry["schedule"] == settings.BATCH_REAP_EVERY_SECONDS


# --- on real processes -------------------------------------------------------------------

#: The real processes' settings: the test settings, with tasks sent through the broker.
PROCESS_SETTINGS = "tests.controlplane.batches.process_settings"
ROOT = Path(__file__).resolve().parents[3]
ENV = {
    "DJANGO_SETTINGS_MODULE": PROCESS_SETTINGS,
    "PYTHONPATH": str(ROOT),
    "BATCH_LINE_TIMEOUT_SECONDS": "4",
    "BATCH_IN_FLIGHT": "8",
    "INFERENCE_BATCH_CONCURRENCY": "4",
    "INFERENCE_CONCURRENCY": "8",
    "TORCH_NUM_THREADS": "1",
    "OMP_NUM_THREADS": "1",
}


@pytest.fixture
def through_the_broker() -> Iterator[None]:
    """Tasks this process sends (the reaper's run_batch) go to the real workers."""
    app.conf.task_always_eager = False
    try:
        yield
    finally:
        app.conf.task_always_eager = True


@contextmanager
def control_worker(tmp: Path) -> Iterator[Any]:
    with worker("control", tmp, **ENV) as process:
        log = tmp / "control.log"
        deadline = time.monotonic() + 60
        while "ready" not in log.read_text(errors="replace"):
            assert process.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        yield process


def wait_for(check: Callable[[], bool], what: str, timeout: float = 120, logs: Any = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}\n{logs() if callable(logs) else ''}")


def _answered(batch_id: str) -> int:
    return BatchLine.objects.filter(batch_id=batch_id).exclude(status="pending").count()


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_a_control_worker_killed_mid_batch_is_resumed_by_the_reaper_answering_each_line_once(
    alice: Person, llama: None, settings: Any, tmp_path: Path, through_the_broker: None
) -> None:
    settings.BATCH_RESUME_AFTER_SECONDS = 1
    purge_broker()
    redis.Redis.from_url(settings.REDIS_URL).delete(batch_queue(queues.GPU_INFERENCE))
    count = 60
    lines = [chat_line(i, max_tokens=24) for i in range(count)]
    lines.append(chat_line(count, url="/v1/completions"))  # a line answered by an error
    data = b"".join(json.dumps(line).encode() + b"\n" for line in lines)

    def logs() -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-2000:]}"
            for p in tmp_path.rglob("*.log")
        )

    with (
        worker("inference", tmp_path / "inference", **ENV) as inference,
        control_worker(tmp_path / "control1") as first,
        asgi_server(tmp_path / "web", **ENV) as web,
    ):
        wait_for(
            lambda: "inference.ready" in (tmp_path / "inference" / "inference.log").read_text(),
            "the inference worker",
            logs=logs,
        )
        assert inference.poll() is None
        client = openai.OpenAI(api_key=alice.key, base_url=web.url + "/v1", max_retries=0)
        file = client.files.create(file=("requests.jsonl", data), purpose="batch")
        wait_for(
            lambda: client.files.retrieve(file.id).status == "processed", "validation", logs=logs
        )
        batch = client.batches.create(input_file_id=file.id, endpoint=CHAT, completion_window="24h")

        # Mid-batch: some lines answered, most not.
        wait_for(lambda: _answered(batch.id) >= 5, "the first answers", logs=logs)
        kill_tree(first.pid)  # SIGKILL the control worker and its pool, runner included
        first.wait()
        time.sleep(1)  # a commit already on its way lands
        before = _answered(batch.id)
        assert before < count, "the batch ended before the kill: make it longer"
        time.sleep(2)
        assert _answered(batch.id) == before  # nothing runs it now
        assert client.batches.retrieve(batch.id).status == "in_progress"

        with control_worker(tmp_path / "control2"):
            time.sleep(2)
            # Its message was taken by the killed worker: nothing resumes it but the reaper.
            assert _answered(batch.id) == before
            assert tasks.reap_batches()["resumed"] == 1
            wait_for(
                lambda: client.batches.retrieve(batch.id).status == "completed",
                "the resumed batch",
                timeout=240,
                logs=logs,
            )
            done = client.batches.retrieve(batch.id)
            assert done.output_file_id
            assert done.error_file_id
            output = client.files.content(done.output_file_id).text.splitlines()
            errors = client.files.content(done.error_file_id).text.splitlines()
    check_each_line_once(alice, batch.id, output, errors, count)


def check_each_line_once(
    person: Person, batch_id: str, output: list[str], errors: list[str], count: int
) -> None:
    ids = [json.loads(x)["custom_id"] for x in output]
    assert sorted(ids) == sorted(f"req-{i}" for i in range(count))  # each exactly once
    assert [json.loads(x)["custom_id"] for x in errors] == [f"req-{count}"]
    lines = list(BatchLine.objects.filter(batch_id=batch_id))
    assert len(lines) == count + 1
    assert all(line.status != "pending" for line in lines)
    entries = LedgerEntry.objects.for_organization(person.organization).filter(reference=batch_id)
    keys = list(entries.values_list("idempotency_key", flat=True))
    assert len(keys) == len(set(keys))
    prompt = entries.filter(meter=Meter.PROMPT_TOKENS)
    assert prompt.count() == count  # one entry per answered line, none twice
    by_id = {line.pk: line for line in lines}
    for entry in prompt:
        line_id = int(entry.idempotency_key.split(":")[2])
        assert entry.quantity == by_id[line_id].prompt_tokens
