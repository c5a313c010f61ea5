"""Usage of inference requests: stored exactly once per request, however often it is reported."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.db import connection

from controlplane.inference.models import UsageRecord
from controlplane.inference.usage import usage_for_organization, usage_record
from jobcontracts import queues
from jobcontracts.inference import UsageReport
from tests.support.jobs import purge_broker
from tests.support.people import Person, client_with, join
from tests.support.processes import worker

AT = 1_800_000_000.0  # 2027-01-15


def report(person: Person, request_id: str = "chatcmpl-1", **fields: Any) -> UsageReport:
    values: dict[str, Any] = {
        "request_id": request_id,
        "organization_id": person.organization.pk,
        "api_key_id": "key_1",
        "model": "atelier-tiny-llama",
        "kind": "chat",
        "prompt_tokens": 12,
        "completion_tokens": 30,
        "status": "completed",
        "latency_ms": 41.5,
        "at": AT,
        **fields,
    }
    return UsageReport(**values)


def records(person: Person) -> list[UsageRecord]:
    return list(UsageRecord.objects.for_organization(person.organization).order_by("pk"))


@pytest.mark.django_db
def test_a_report_is_stored_with_its_tokens_key_and_time(alice: Person) -> None:
    assert usage_record(report(alice).to_json()) == "applied"

    (row,) = records(alice)
    assert row.pk.startswith("usage_")
    assert (row.request_id, row.api_key_id, row.model, row.kind, row.status) == (
        "chatcmpl-1",
        "key_1",
        "atelier-tiny-llama",
        "chat",
        "completed",
    )
    assert (row.prompt_tokens, row.completion_tokens, row.total_tokens) == (12, 30, 42)
    assert row.latency_ms == 41.5
    assert row.created_at.timestamp() == AT
    assert row.recorded_at is not None


@pytest.mark.django_db
def test_the_same_report_applied_three_times_is_stored_once(alice: Person) -> None:
    payload = report(alice).to_json()
    outcomes = [usage_record(payload) for _ in range(3)]
    assert outcomes == ["applied", "duplicate", "duplicate"]
    assert len(records(alice)) == 1


@pytest.mark.django_db
def test_a_cancelled_stream_is_billed_for_the_tokens_it_produced(alice: Person) -> None:
    payload = report(alice, "chatcmpl-2", status="cancelled", completion_tokens=7).to_json()
    assert usage_record(payload) == "applied"
    (row,) = records(alice)
    assert (row.status, row.completion_tokens) == ("cancelled", 7)


@pytest.mark.django_db
def test_a_report_for_an_unknown_organization_is_dropped(alice: Person) -> None:
    payload = report(alice, organization_id="org_gone").to_json()
    assert usage_record(payload) == "dropped"
    assert not UsageRecord.objects.dangerously_unscoped().exists()


@pytest.mark.django_db
@pytest.mark.parametrize(
    "change",
    [
        {"kind": "painting"},
        {"status": "maybe"},
        {"prompt_tokens": -1},
        {"completion_tokens": "7"},
        {"latency_ms": "fast"},
        {"request_id": ""},
        {"request_id": "x" * 201},
    ],
)
def test_a_malformed_report_is_refused_without_storing_anything(
    alice: Person, change: dict[str, Any]
) -> None:
    payload = {**report(alice).to_json(), **change}
    assert usage_record(payload) == "invalid"
    assert records(alice) == []


@pytest.mark.django_db
def test_a_field_a_newer_worker_added_is_ignored_and_the_report_applied(alice: Person) -> None:
    # Workers may be upgraded before the control plane: a report must not be lost (nor
    # dead-lettered) for a field this version does not know.
    payload = {**report(alice).to_json(), "cached_tokens": 3}
    assert usage_record(payload) == "applied"
    assert [r.request_id for r in records(alice)] == ["chatcmpl-1"]


@pytest.mark.django_db(transaction=True)
def test_concurrent_deliveries_of_one_report_store_it_once(alice: Person) -> None:
    payload = report(alice, "chatcmpl-race").to_json()
    barrier = threading.Barrier(6)
    outcomes: list[str] = []
    errors: list[BaseException] = []

    def deliver() -> None:
        try:
            barrier.wait()
            outcomes.append(usage_record(payload))
        except BaseException as exc:  # surfaced below
            errors.append(exc)
        finally:
            connection.close()  # each thread had its own connection

    threads = [threading.Thread(target=deliver) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)

    assert errors == []
    assert sorted(outcomes) == ["applied"] + ["duplicate"] * 5
    assert len(records(alice)) == 1


# --- the listing ---------------------------------------------------------------------------


def _seed(alice: Person) -> None:
    for one in (
        report(alice, "r1", at=AT),
        report(alice, "r2", at=AT + 60, model="ft:x", api_key_id="key_2"),
        report(alice, "r3", at=AT + 120, kind="embedding", completion_tokens=0),
    ):
        assert usage_record(one.to_json()) == "applied"
        time.sleep(0.002)  # ids order by the millisecond they were made in


@pytest.mark.django_db
def test_the_usage_listing_filters_by_time_model_and_key(alice: Person) -> None:
    _seed(alice)

    def ids(query: str = "") -> list[str]:
        response = alice.client.get(f"/v1/organization/inference_usage{query}")
        assert response.status_code == 200, response.content
        return [r["request_id"] for r in response.json()["data"]]

    assert ids() == ["r3", "r2", "r1"]  # newest first
    assert ids("?model=ft:x") == ["r2"]
    assert ids("?api_key_id=key_1") == ["r3", "r1"]
    assert ids(f"?start_time={int(AT) + 60}") == ["r3", "r2"]
    assert ids(f"?start_time={int(AT)}&end_time={int(AT) + 60}") == ["r1"]
    page = alice.client.get("/v1/organization/inference_usage?limit=2").json()
    assert page["has_more"] is True
    rest = alice.client.get(f"/v1/organization/inference_usage?after={page['last_id']}").json()
    assert [r["request_id"] for r in rest["data"]] == ["r1"]

    (row,) = alice.client.get("/v1/organization/inference_usage?model=ft:x").json()["data"]
    assert row == {
        "id": row["id"],
        "object": "inference.usage",
        "request_id": "r2",
        "api_key_id": "key_2",
        "model": "ft:x",
        "kind": "chat",
        "prompt_tokens": 12,
        "completion_tokens": 30,
        "total_tokens": 42,
        "status": "completed",
        "latency_ms": 41.5,
        "created_at": int(AT) + 60,
    }
    bad = alice.client.get("/v1/organization/inference_usage?start_time=yesterday")
    assert bad.status_code == 400
    assert bad.json()["error"]["param"] == "start_time"


@pytest.mark.django_db
def test_the_selector_cuts_periods_on_when_requests_ran(alice: Person) -> None:
    from datetime import UTC, datetime

    _seed(alice)
    start = datetime.fromtimestamp(AT + 60, tz=UTC)
    end = datetime.fromtimestamp(AT + 120, tz=UTC)
    rows = usage_for_organization(alice.organization, start=start, end=end)
    assert [r.request_id for r in rows] == ["r2"]
    assert (
        list(usage_for_organization(alice.organization, start=None, end=None, model="none")) == []
    )


@pytest.mark.django_db
def test_an_organization_sees_only_its_own_usage(alice: Person, charlie: Person) -> None:
    _seed(alice)
    usage_record(report(charlie, "c1").to_json())
    listed = charlie.client.get("/v1/organization/inference_usage").json()["data"]
    assert [r["request_id"] for r in listed] == ["c1"]
    # A filter naming Alice's key finds nothing of hers.
    assert (
        charlie.client.get("/v1/organization/inference_usage?api_key_id=key_2").json()["data"] == []
    )


@pytest.mark.django_db
def test_usage_needs_a_key_with_billing_read(alice: Person) -> None:
    assert client_with(None).get("/v1/organization/inference_usage").status_code == 401
    developer = join(alice.organization, "dev@acme.test", "developer")
    response = developer.client.get("/v1/organization/inference_usage")
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "missing_scope"
    accountant = join(alice.organization, "billing@acme.test", "billing")
    assert accountant.client.get("/v1/organization/inference_usage").status_code == 200


# --- a real control worker -----------------------------------------------------------------


@pytest.fixture
def _broker() -> Iterator[None]:
    purge_broker()
    yield
    purge_broker()


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
# The test settings run .delay() eagerly; this sends by task name, through Redis, for real.
@pytest.mark.filterwarnings("ignore:Results are not stored in backend")
@pytest.mark.usefixtures("_broker")
def test_a_control_worker_stores_a_report_sent_by_task_name_once(
    alice: Person, tmp_path: Path
) -> None:
    from controlplane.celery import app

    payload = report(alice, "chatcmpl-worker").to_json()
    with worker("control", tmp_path):
        sent = [
            app.send_task(queues.CONTROL_USAGE_REPORT, args=[payload], queue=queues.CONTROL)
            for _ in range(2)
        ]
        outcomes = [result.get(timeout=60) for result in sent]

    assert sorted(outcomes) == ["applied", "duplicate"]
    deadline = time.monotonic() + 5
    while not records(alice) and time.monotonic() < deadline:
        time.sleep(0.1)
    (row,) = records(alice)
    assert (row.request_id, row.prompt_tokens, row.completion_tokens) == ("chatcmpl-worker", 12, 30)


@pytest.mark.django_db
def test_staff_read_the_usage_ledger_but_cannot_change_it(alice: Person) -> None:
    from django.test import Client
    from django.urls import reverse

    from controlplane.accounts.models import User

    _seed(alice)
    row = next(r for r in records(alice) if r.request_id == "r1")
    staff = Client()
    staff.force_login(User.objects.create_superuser(email="ops@atelier.test", password="x" * 12))

    listing = staff.get("/admin/inference/usagerecord/?q=r1")
    detail = staff.get(reverse("admin:inference_usagerecord_change", args=[row.pk]))
    assert listing.status_code == detail.status_code == 200
    assert b"r1" in listing.content
    assert staff.get("/admin/inference/usagerecord/add/").status_code == 403
    changed = staff.post(
        reverse("admin:inference_usagerecord_change", args=[row.pk]), {"prompt_tokens": "0"}
    )
    assert changed.status_code == 403
    row.refresh_from_db()
    assert row.prompt_tokens == 12
