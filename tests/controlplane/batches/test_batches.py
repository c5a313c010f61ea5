"""The Batch API: OpenAI's shapes through the official SDK, its refusals, and a run on a
real inference worker (per-line errors, the batch price, a worker killed mid-batch)."""

from __future__ import annotations

import io
import json
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import openai
import pytest
import redis
from django.utils import timezone

from controlplane.batches import runner, services
from controlplane.batches.models import Batch, BatchLine, BatchStatus
from controlplane.billing.ledger import ledger_append
from controlplane.billing.models import LedgerEntry, Meter
from controlplane.billing.prices import price_set
from controlplane.datasets.models import File
from controlplane.datasets.services import file_validate
from controlplane.limits.budgets import BudgetSpec, budget_state
from controlplane.limits.models import KeyLimits
from controlplane.modelregistry.models import BaseModel
from jobcontracts import queues
from jobcontracts.inference import batch_queue
from tests.gpuworkers.test_inference_worker import inference_worker
from tests.support.budgets import monthly_budget
from tests.support.models import tiny_model_dir
from tests.support.people import Person, client_with
from tests.support.registry import customer_model
from tests.support.sdk import in_process_sdk

LLAMA = "atelier-tiny-llama"
CHAT = "/v1/chat/completions"


def chat_line(i: int, model: str = LLAMA, url: str = CHAT, **body: Any) -> dict[str, Any]:
    return {
        "custom_id": f"req-{i}",
        "method": "POST",
        "url": url,
        "body": {
            "model": model,
            "messages": [{"role": "user", "content": f"say {i}"}],
            "max_tokens": 4,
            "temperature": 0,
            **body,
        },
    }


def upload(client: openai.OpenAI, person: Person, lines: list[dict[str, Any]]) -> str:
    data = b"".join(json.dumps(line).encode() + b"\n" for line in lines)
    file = client.files.create(file=("requests.jsonl", io.BytesIO(data)), purpose="batch")
    file_validate(file_id=file.id, organization_id=person.organization.pk)  # the Files API's task
    return file.id


def test_the_sdk_creates_lists_retrieves_and_cancels_batches(
    alice: Person, charlie: Person
) -> None:
    with in_process_sdk(alice.key) as client:
        file_id = upload(client, alice, [chat_line(1), chat_line(2)])
        batch = client.batches.create(
            input_file_id=file_id,
            endpoint=CHAT,
            completion_window="24h",
            metadata={"job": "nightly"},
        )
        assert batch.object == "batch"
        assert batch.status == "validating"
        assert batch.input_file_id == file_id
        assert batch.metadata == {"job": "nightly"}
        assert batch.request_counts is not None
        assert batch.request_counts.total == 0
        assert client.batches.retrieve(batch.id).id == batch.id

        second = client.batches.create(
            input_file_id=file_id, endpoint=CHAT, completion_window="24h"
        )
        page = client.batches.list(limit=1)
        assert [b.id for b in page.data] == [second.id]
        assert page.has_more
        assert [b.id for b in client.batches.list(limit=1, after=second.id).data] == [batch.id]

        cancelled = client.batches.cancel(batch.id)
        assert cancelled.status == "cancelling"
        assert cancelled.cancelling_at is not None

        # A finished batch cannot be cancelled.
        Batch.objects.for_organization(alice.organization).filter(pk=second.id).update(
            status=BatchStatus.COMPLETED
        )
        with pytest.raises(openai.ConflictError):
            client.batches.cancel(second.id)

    # Another organization's batches and files do not exist for charlie.
    with in_process_sdk(charlie.key) as theirs:
        with pytest.raises(openai.NotFoundError):
            theirs.batches.retrieve(batch.id)
        with pytest.raises(openai.NotFoundError):
            theirs.batches.cancel(batch.id)
        with pytest.raises(openai.NotFoundError):
            theirs.batches.create(input_file_id=file_id, endpoint=CHAT, completion_window="24h")
        assert theirs.batches.list().data == []


def test_bad_requests_are_refused_and_change_nothing(alice: Person) -> None:
    fine_tune = File.objects.create(
        organization=alice.organization,
        filename="t.jsonl",
        purpose="fine-tune",
        bytes=1,
        sha256="0",
        status="processed",
    )
    good = {"input_file_id": fine_tune.pk, "endpoint": CHAT, "completion_window": "24h"}
    cases: list[tuple[Any, int, str | None]] = [
        ({**good, "completion_window": "1h"}, 400, "completion_window"),
        ({**good, "endpoint": "/v1/moderations"}, 400, "endpoint"),
        ({**good, "surprise": 1}, 400, "surprise"),
        ({"endpoint": CHAT, "completion_window": "24h"}, 400, "input_file_id"),
        ({**good, "input_file_id": "file-nope"}, 404, "id"),
        (good, 400, "input_file_id"),  # not a batch file
        ([1, 2], 400, None),
    ]
    for body, status, param in cases:
        response = alice.client.post("/v1/batches", body, format="json")
        assert response.status_code == status, (body, response.content)
        assert response.json()["error"]["param"] == param, body
    raw = alice.client.post("/v1/batches", b"{nope", content_type="application/json")
    assert raw.status_code == 400
    assert client_with(None).get("/v1/batches").status_code == 401
    assert client_with(None).post("/v1/batches", good, format="json").status_code == 401
    assert Batch.objects.for_organization(alice.organization).count() == 0


def test_lines_past_a_spent_hard_budget_fail_with_insufficient_quota(
    alice: Person, llama: None
) -> None:
    redis.Redis.from_url(_redis_url()).delete(batch_queue(queues.GPU_INFERENCE))
    monthly_budget(alice, "0.01", kind="hard")
    ledger_append(  # $2 already spent this month
        organization_id=alice.organization.pk,
        idempotency_key="spent-before",
        meter=Meter.PROMPT_TOKENS,
        quantity=1_000_000,
        occurred_at=timezone.now(),
        source="test",
        model=LLAMA,
    )
    with in_process_sdk(alice.key) as client:
        file_id = upload(client, alice, [chat_line(1), chat_line(2)])
        batch = client.batches.create(input_file_id=file_id, endpoint=CHAT, completion_window="24h")
        assert runner.batch_run(batch_id=batch.id, organization_id=alice.organization.pk) == (
            "completed"
        )
        done = client.batches.retrieve(batch.id)
        assert done.request_counts is not None
        assert done.request_counts.failed == 2
        assert done.output_file_id is None
        assert done.error_file_id
        errors = client.files.content(done.error_file_id).text.splitlines()
    for line in map(json.loads, errors):
        assert line["response"]["status_code"] == 429
        assert line["response"]["body"]["error"]["code"] == "insufficient_quota"
    assert redis.Redis.from_url(_redis_url()).llen(batch_queue(queues.GPU_INFERENCE)) == 0


@pytest.mark.parametrize(
    ("ending", "code"), [("cancelled", "batch_cancelled"), ("expired", "batch_expired")]
)
def test_a_cancelled_or_expired_batch_ends_with_its_unrun_lines_in_the_error_file(
    alice: Person, llama: None, ending: str, code: str
) -> None:
    with in_process_sdk(alice.key) as client:
        file_id = upload(client, alice, [chat_line(1), chat_line(2)])
        created = client.batches.create(
            input_file_id=file_id, endpoint=CHAT, completion_window="24h"
        )
        batch = Batch.objects.for_organization(alice.organization).get(pk=created.id)
        assert services.batch_load_lines(batch=batch)
        if ending == "cancelled":
            assert client.batches.cancel(created.id).status == "cancelling"
        else:
            Batch.objects.for_organization(alice.organization).filter(pk=batch.pk).update(
                expires_at=timezone.now()
            )
        assert runner.batch_run(batch_id=batch.pk, organization_id=alice.organization.pk) == (
            ending
        )
        done = client.batches.retrieve(created.id)
        assert done.status == ending
        assert getattr(done, f"{ending}_at") is not None
        assert done.output_file_id is None
        assert done.error_file_id
        errors = client.files.content(done.error_file_id).text.splitlines()
        with pytest.raises(openai.ConflictError):
            client.batches.cancel(created.id)
    assert [json.loads(e)["custom_id"] for e in errors] == ["req-1", "req-2"]
    assert {json.loads(e)["error"]["code"] for e in errors} == {code}
    assert redis.Redis.from_url(_redis_url()).llen(batch_queue(queues.GPU_INFERENCE)) == 0


def test_a_file_that_failed_validation_fails_the_batch_with_the_reason(alice: Person) -> None:
    bad = {"custom_id": "x", "method": "GET", "url": CHAT, "body": {}}
    with in_process_sdk(alice.key) as client:
        file_id = upload(client, alice, [chat_line(1), bad])
        created = client.batches.create(
            input_file_id=file_id, endpoint=CHAT, completion_window="24h"
        )
        assert runner.batch_run(batch_id=created.id, organization_id=alice.organization.pk) == (
            "failed"
        )
        failed = client.batches.retrieve(created.id)
    assert failed.status == "failed"
    assert failed.failed_at is not None
    assert failed.errors is not None
    assert failed.errors.data is not None
    error = failed.errors.data[0]
    assert error.code == "invalid_file"
    assert error.line == 2
    assert "method" in (error.message or "")


# --- on a real inference worker -------------------------------------------------------------


@pytest.fixture
def llama(db: None) -> None:
    BaseModel.objects.create(
        id=LLAMA,
        family="llama",
        tasks=["causal_lm"],
        methods=["supervised"],
        adapters=["lora"],
        context_length=256,
        uri=tiny_model_dir("llama").as_uri(),
        price_per_1k_training_tokens=Decimal("0.0008"),
    )
    start = datetime(2020, 1, 1, tzinfo=UTC)
    for meter, price in ((Meter.PROMPT_TOKENS, "2"), (Meter.COMPLETION_TOKENS, "6")):
        price_set(meter=meter, model=LLAMA, unit_price=Decimal(price), effective_from=start)


@pytest.fixture
def worker(tmp_path: Path, llama: None) -> Iterator[Any]:
    redis.Redis.from_url(_redis_url()).delete(batch_queue(queues.GPU_INFERENCE))
    with inference_worker(tmp_path / "inference.log", INFERENCE_BATCH_CONCURRENCY="4") as process:
        yield process


def _redis_url() -> str:
    from django.conf import settings

    return str(settings.REDIS_URL)


@pytest.mark.slow
def test_a_batch_runs_on_the_worker_with_per_line_errors_at_the_batch_price(
    worker: Any, alice: Person, charlie: Person, settings: Any
) -> None:
    theirs = customer_model(charlie, suffix="theirs").pk  # a model alice cannot use
    lines = [chat_line(i) for i in range(6)]
    lines.append(chat_line(6, url="/v1/completions"))  # not the batch's endpoint
    lines.append(chat_line(7, model=theirs))
    lines.append(chat_line(8, messages="not a list"))
    budget = monthly_budget(alice, "100")
    created = alice.client.post(
        "/v1/organization/api_keys", {"name": "nightly", "scopes": ["all"]}, format="json"
    ).json()
    with in_process_sdk(created["value"]) as client:
        file_id = upload(client, alice, lines)
        batch = client.batches.create(input_file_id=file_id, endpoint=CHAT, completion_window="24h")
    # The batch's key may make one request a minute: its lines are no requests of its own.
    KeyLimits.objects.create(
        organization=alice.organization,
        api_key_id=created["id"],
        requests_per_minute=1,
        tokens_per_minute=1,
    )
    assert runner.batch_run(batch_id=batch.id, organization_id=alice.organization.pk) == (
        "completed"
    )
    with in_process_sdk(alice.key) as client:
        done = client.batches.retrieve(batch.id)
        assert done.status == "completed"
        assert done.in_progress_at
        assert done.finalizing_at
        assert done.completed_at
        assert done.request_counts is not None
        assert (done.request_counts.total, done.request_counts.completed) == (9, 6)
        assert done.request_counts.failed == 3
        assert done.output_file_id
        assert done.error_file_id
        output = [
            json.loads(x) for x in client.files.content(done.output_file_id).text.splitlines()
        ]
        errors = [json.loads(x) for x in client.files.content(done.error_file_id).text.splitlines()]

    assert [o["custom_id"] for o in output] == [f"req-{i}" for i in range(6)]
    for o in output:
        assert o["error"] is None
        assert o["response"]["status_code"] == 200
        body = o["response"]["body"]
        assert body["object"] == "chat.completion"
        assert body["usage"]["completion_tokens"] <= 4
    by_id = {e["custom_id"]: e for e in errors}
    assert by_id["req-6"]["error"]["code"] == "invalid_url"
    assert by_id["req-7"]["response"]["status_code"] == 404
    assert by_id["req-7"]["response"]["body"]["error"]["param"] == "model"
    assert by_id["req-8"]["response"]["status_code"] == 400

    # Billed once per line, at half the live price, by the batch (not the usage stream).
    entries = list(LedgerEntry.objects.for_organization(alice.organization))
    assert {e.source for e in entries} == {"batches"}
    prompt = [e for e in entries if e.meter == Meter.PROMPT_TOKENS]
    assert len(prompt) == 6
    assert {e.unit_price for e in prompt} == {Decimal("1")}
    completion = [e for e in entries if e.meter == Meter.COMPLETION_TOKENS]
    assert {e.unit_price for e in completion} <= {Decimal("3")}
    tokens = sum(o["response"]["body"]["usage"]["prompt_tokens"] for o in output)
    assert sum(e.quantity for e in prompt) == tokens
    assert {e.api_key_id for e in entries} == {created["id"]}
    cost = sum(e.quantity * e.unit_price / e.per_units for e in entries)
    assert cost > 0
    # Counted against the organization's budget, at the batch price.
    assert budget_state(BudgetSpec.of(budget)).spent == cost

    # Running it again answers nothing twice.
    assert runner.batch_run(batch_id=batch.id, organization_id=alice.organization.pk) == (
        "completed"
    )
    assert LedgerEntry.objects.for_organization(alice.organization).count() == len(entries)


@pytest.mark.slow
def test_a_worker_killed_mid_batch_loses_no_line_and_answers_none_twice(
    worker: Any, alice: Person, settings: Any, tmp_path: Path
) -> None:
    settings.BATCH_LINE_TIMEOUT_SECONDS = 4
    settings.BATCH_IN_FLIGHT = 8
    count = 60
    lines = [chat_line(i, max_tokens=24) for i in range(count)]
    with in_process_sdk(alice.key) as client:
        file_id = upload(client, alice, lines)
        batch = client.batches.create(input_file_id=file_id, endpoint=CHAT, completion_window="24h")

    restarted: list[Any] = []

    listener = redis.Redis.from_url(_redis_url()).pubsub()
    listener.psubscribe(f"atelier:batch:{batch.id}:*")  # the runner's reply channel

    def kill_and_restart() -> None:
        answered = 0
        deadline = time.monotonic() + 60
        while answered < 10 and time.monotonic() < deadline:  # mid-batch
            message = listener.get_message(timeout=1)
            if message and message["type"] == "pmessage":
                replies = json.loads(message["data"])
                replies = replies if isinstance(replies, list) else [replies]
                answered += sum(1 for r in replies if r["type"] == "done")
        listener.close()
        worker.kill()  # SIGKILL: the lines it holds are never answered
        worker.wait()
        with inference_worker(tmp_path / "again.log", INFERENCE_BATCH_CONCURRENCY="4") as again:
            restarted.append(again)
            while not done.is_set():
                time.sleep(0.2)

    done = threading.Event()
    thread = threading.Thread(target=kill_and_restart)
    thread.start()
    try:
        outcome = runner.batch_run(batch_id=batch.id, organization_id=alice.organization.pk)
    finally:
        done.set()
        thread.join()
    assert outcome == "completed"
    assert restarted
    lines_run = list(BatchLine.objects.filter(batch_id=batch.id))
    assert all(line.status == "succeeded" for line in lines_run)
    assert max(line.attempts for line in lines_run) >= 2  # some were lost with the worker
    with in_process_sdk(alice.key) as client:
        done_batch = client.batches.retrieve(batch.id)
        assert done_batch.output_file_id
        output = client.files.content(done_batch.output_file_id).text.splitlines()
    ids = [json.loads(x)["custom_id"] for x in output]
    assert sorted(ids) == sorted(f"req-{i}" for i in range(count))  # each exactly once
    prompt = LedgerEntry.objects.for_organization(alice.organization).filter(
        meter=Meter.PROMPT_TOKENS
    )
    assert prompt.count() == count  # billed once per line


# --- output files: purpose batch_output ----------------------------------------------------


def test_output_files_are_listed_as_batch_output_and_that_purpose_cannot_be_uploaded(
    alice: Person, llama: None
) -> None:
    with in_process_sdk(alice.key) as client:
        file_id = upload(client, alice, [chat_line(1)])
        created = client.batches.create(
            input_file_id=file_id, endpoint=CHAT, completion_window="24h"
        )
        batch = Batch.objects.for_organization(alice.organization).get(pk=created.id)
        assert services.batch_load_lines(batch=batch)
        client.batches.cancel(created.id)
        assert runner.batch_run(batch_id=created.id, organization_id=alice.organization.pk) == (
            "cancelled"
        )
        error_file_id = client.batches.retrieve(created.id).error_file_id
        assert error_file_id
        listed = client.files.list(purpose="batch_output")
        assert [f.id for f in listed.data] == [error_file_id]
        assert listed.data[0].purpose == "batch_output"
        assert client.files.retrieve(error_file_id).purpose == "batch_output"
        assert {f.id for f in client.files.list().data} == {file_id, error_file_id}
        assert [f.id for f in client.files.list(purpose="batch").data] == [file_id]

        # Written by the platform only, as OpenAI's: no upload, whole or in parts.
        with pytest.raises(openai.BadRequestError) as refused:
            client.files.create(file=("out.jsonl", io.BytesIO(b"{}\n")), purpose="batch_output")  # type: ignore[arg-type]
        assert "batch_output" in refused.value.message
    response = alice.client.post(
        "/v1/uploads",
        {"filename": "o.jsonl", "purpose": "batch_output", "bytes": 3, "mime_type": "text/plain"},
        format="json",
    )
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "purpose"
    assert alice.client.get("/v1/files?purpose=nonsense").status_code == 400
    assert File.objects.for_organization(alice.organization).count() == 2


# --- the admin ------------------------------------------------------------------------------


@pytest.fixture
def staff_client(db: None) -> Any:
    from django.test import Client

    from controlplane.accounts.models import User

    user = User.objects.create_superuser(email="ops@atelier.test", password="staff pass 12345")
    client = Client()
    client.force_login(user)
    return client


def test_the_admin_lists_batches_shows_their_lines_and_cancels_them(
    alice: Person, staff_client: Any
) -> None:
    from django.contrib.admin.utils import quote
    from django.urls import reverse

    from controlplane.audit.models import AuditLog

    with in_process_sdk(alice.key) as client:
        file_id = upload(client, alice, [chat_line(i) for i in range(3)])
        created = client.batches.create(
            input_file_id=file_id, endpoint=CHAT, completion_window="24h"
        )
        other = client.batches.create(input_file_id=file_id, endpoint=CHAT, completion_window="24h")
    batch = Batch.objects.for_organization(alice.organization).get(pk=created.id)
    assert services.batch_load_lines(batch=batch)
    BatchLine.objects.filter(batch=batch, index=0).update(status="succeeded", attempts=2)
    BatchLine.objects.filter(batch=batch, index=1).update(status="failed", attempts=1)
    services.counts_refresh(batch)

    listing = staff_client.get(reverse("admin:batches_batch_changelist"))
    assert listing.status_code == 200
    page = listing.content.decode()
    assert created.id in page
    assert other.id in page
    assert "1 / 1 / 3" in page  # completed / failed / total
    assert alice.organization.name in page
    filtered = staff_client.get(reverse("admin:batches_batch_changelist") + "?status=in_progress")
    assert [b.pk for b in filtered.context_data["cl"].result_list] == [created.id]

    change = reverse("admin:batches_batch_change", args=[quote(created.id)])
    assert "_5F" in change  # ids hold `_`: quoted in links, unquoted by the views
    detail = staff_client.get(change).content.decode()
    for field, value in (("pending", 1), ("succeeded", 1), ("failed", 1), ("resent", 1)):
        assert f'id="lines-{field}">{value}<' in detail, field
    assert reverse("admin:datasets_file_change", args=[quote(file_id)]) in detail
    cancel = reverse("admin:batches_batch_cancel", args=[quote(created.id)])
    assert f'formaction="{cancel}"' in detail
    assert 'name="_save"' not in detail  # read-only: nothing to save

    assert staff_client.get(cancel).status_code == 405
    assert staff_client.post(cancel).status_code == 302
    assert Batch.objects.for_organization(alice.organization).get(pk=created.id).status == (
        "cancelling"
    )
    assert "Not cancellable" not in detail
    assert "Not cancellable (cancelling)" in staff_client.get(change).content.decode()
    assert (
        staff_client.post(
            reverse("admin:batches_batch_cancel", args=[quote("batch_nope")])
        ).status_code
        == 404
    )

    # The list action: the cancellable ones; a finished one is left as it is.
    Batch.objects.for_organization(alice.organization).filter(pk=created.id).update(
        status=BatchStatus.COMPLETED
    )
    staff_client.post(
        reverse("admin:batches_batch_changelist"),
        {"action": "cancel_batches", "_selected_action": [created.id, other.id]},
    )
    statuses = dict(Batch.objects.for_organization(alice.organization).values_list("pk", "status"))
    assert statuses == {created.id: "completed", other.id: "cancelling"}
    audited = AuditLog.objects.for_organization(alice.organization).filter(
        action="admin.batch.cancelled"
    )
    assert sorted(audited.values_list("target_id", flat=True)) == sorted([created.id, other.id])
