"""The staff dashboard at /admin/dashboard/: jobs per queue, failed jobs of the day,
inference of the last hour, revenue of the month; staff only, at a constant query cost."""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from controlplane.accounts.models import User
from controlplane.billing.ledger import Entry, ledger_append_many
from controlplane.billing.models import Invoice, InvoiceStatus, Meter
from controlplane.core.ids import new_compression_job_id
from controlplane.inference import request_errors
from controlplane.inference.models import UsageRecord
from controlplane.jobs.models import Job, JobKind, JobStatus
from controlplane.modelregistry.models import BaseModel
from controlplane.staff import selectors
from tests.controlplane.billing.factories import price
from tests.support.people import Person
from tests.support.registry import base_model
from tests.support.serving import serve

pytestmark = pytest.mark.django_db

MODEL = "dashboard-model"


@pytest.fixture
def staff(db: None) -> Client:
    user = User.objects.create_superuser(email="ops@atelier.test", password="staff pass 12345")
    client = Client()
    client.force_login(user)
    return client


@pytest.fixture
def base(db: None) -> BaseModel:
    return base_model(MODEL)


def job(person: Person, base: BaseModel, status: str, **fields: Any) -> Job:
    if fields.get("kind") == JobKind.COMPRESSION:
        fields.setdefault("id", new_compression_job_id())
        fields.setdefault("method", "quantize")
    return Job.objects.create(  # type: ignore[no-any-return]
        organization=person.organization,
        base_model=base,
        seed=1,
        status=status,
        hyperparameters={},
        **fields,
    )


_n = iter(range(10**6))


def usage(person: Person, at: datetime, status: str = "completed", tokens: int = 10) -> None:
    UsageRecord.objects.create(
        organization=person.organization,
        request_id=f"req-dash-{next(_n)}",
        model=MODEL,
        kind="chat",
        prompt_tokens=tokens,
        completion_tokens=tokens,
        status=status,
        latency_ms=20.0,
        created_at=at,
    )


def ledger(person: Person, meter: str, quantity: int, at: datetime) -> None:
    ledger_append_many(
        [
            Entry(
                organization_id=person.organization.pk,
                idempotency_key=f"dash:{next(_n)}",
                meter=meter,
                quantity=quantity,
                occurred_at=at,
                source="test",
                model=MODEL,
            )
        ]
    )


def invoice(person: Person, status: str, total: str, period: datetime) -> None:
    Invoice.objects.create(
        organization=person.organization,
        period_start=period,
        period_end=period + timedelta(days=28),
        subtotal=Decimal(total),
        total=Decimal(total),
        status=status,
    )


def section(html: str, element_id: str) -> str:
    match = re.search(rf'<section[^>]*id="{element_id}".*?</section>', html, re.S)
    assert match, element_id
    return match.group(0)


def cell(html: str, css_class: str) -> str:
    match = re.search(rf'class="[^"]*\b{css_class}\b[^"]*"[^>]*>\s*([^<]*)', html)
    assert match, css_class
    return match.group(1).strip()


def seed(alice: Person, charlie: Person, base: BaseModel, scale: int) -> None:
    """`scale` times: jobs in every state and queue, usage of the hour and before, ledger
    entries of this month and the last, invoices."""
    now = timezone.now()
    for _ in range(scale):
        job(alice, base, JobStatus.RUNNING, dispatched_at=now)
        job(alice, base, JobStatus.QUEUED, queued_at=now - timedelta(minutes=5))
        job(charlie, base, JobStatus.QUEUED, queued_at=now, dispatched_at=now)
        job(charlie, base, JobStatus.RUNNING, kind=JobKind.COMPRESSION, dispatched_at=now)
        job(alice, base, JobStatus.QUEUED, kind=JobKind.COMPRESSION, queued_at=now)
        job(alice, base, JobStatus.PAUSED)
        job(alice, base, JobStatus.SUCCEEDED, finished_at=now)
        job(alice, base, JobStatus.VALIDATING_FILES)
        job(
            charlie,
            base,
            JobStatus.FAILED,
            finished_at=now - timedelta(hours=2),
            error={"code": "oom", "message": "Out of memory"},
        )
        job(alice, base, JobStatus.FAILED, finished_at=now - timedelta(hours=30))  # too old
        usage(alice, now - timedelta(minutes=10))
        usage(charlie, now - timedelta(minutes=50), status="failed")
        usage(alice, now - timedelta(minutes=70))  # before the hour
        ledger(alice, Meter.PROMPT_TOKENS, 1_000_000, now)
        ledger(charlie, Meter.COMPLETION_TOKENS, 500_000, now)


@pytest.fixture
def prices(db: None) -> None:
    since = datetime(2000, 1, 1, tzinfo=UTC)
    price(Meter.PROMPT_TOKENS, "2.00", since, model=MODEL)
    price(Meter.COMPLETION_TOKENS, "8.00", since, model=MODEL)


def test_the_dashboard_shows_jobs_failures_inference_and_revenue(
    staff: Client, alice: Person, charlie: Person, base: BaseModel, prices: None
) -> None:
    seed(alice, charlie, base, 1)
    start_of_month = timezone.now().replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    invoice(alice, InvoiceStatus.PAID, "12.50", start_of_month - timedelta(days=31))
    invoice(charlie, InvoiceStatus.OPEN, "3.25", start_of_month - timedelta(days=31))
    request_errors.record(429)
    request_errors.record(429)
    request_errors.record(401)
    request_errors.record(500, at=time.time() - 2 * 3600)  # long gone

    response = staff.get("/admin/dashboard/")

    assert response.status_code == 200
    html = response.content.decode()

    queues = section(html, "jobs-by-queue")
    training = re.search(r'data-queue="gpu.training".*?</tr>', queues, re.S).group(0)  # type: ignore[union-attr]
    compression = re.search(r'data-queue="gpu.compression".*?</tr>', queues, re.S).group(0)  # type: ignore[union-attr]
    assert [cell(training, c) for c in ("running", "queued", "waiting", "sent", "paused")] == [
        "1",
        "2",
        "1",
        "1",
        "1",
    ]
    assert [cell(compression, c) for c in ("running", "queued", "waiting", "sent", "paused")] == [
        "1",
        "1",
        "1",
        "0",
        "0",
    ]

    failed = section(html, "failed-jobs")
    assert cell(failed, "count") == "1"
    (failed_job,) = Job.objects.dangerously_unscoped().filter(
        status=JobStatus.FAILED, organization=charlie.organization
    )
    assert f'href="/admin/jobs/job/{failed_job.pk}/change/"' in failed
    assert "Out of memory" in failed
    assert "Globex" in failed

    inference = section(html, "inference-last-hour")
    assert cell(inference, "ran") == "2"
    assert cell(inference, "failed") == "1"
    assert cell(inference, "refused") == "3"
    assert "429: 2" in inference
    assert "401: 1" in inference
    assert "500" not in inference
    assert cell(inference, "requests") == "5"  # 2 that ran + 3 answered with an error
    assert cell(inference, "errors") == "4"  # 1 failed while running + 3
    assert cell(inference, "tokens") == "40"

    revenue = section(html, "revenue-mtd")
    # 1M prompt tokens at $2/M + 0.5M completion tokens at $8/M.
    assert cell(revenue, "usage") == "$6.00"
    assert (cell(revenue, "paid"), cell(revenue, "paid-amount")) == ("1", "$12.50")
    assert (cell(revenue, "open"), cell(revenue, "open-amount")) == ("1", "$3.25")


def test_the_numbers_match_the_seeded_data_at_any_scale(
    alice: Person, charlie: Person, base: BaseModel, prices: None
) -> None:
    seed(alice, charlie, base, 3)
    data = selectors.dashboard()
    training, compression = data["queues"]
    assert (training.queue, training.running, training.waiting, training.sent) == (
        "gpu.training",
        3,
        3,
        3,
    )
    assert (compression.queue, compression.running, compression.queued) == ("gpu.compression", 3, 3)
    assert training.oldest_queued_at is not None
    assert data["failed"].count == 3
    assert data["inference"].ran == 6
    assert data["inference"].failed == 3
    assert data["revenue"].usage == Decimal("18.00")
    assert data["revenue"].by_meter == {
        Meter.PROMPT_TOKENS: Decimal("6.00"),
        Meter.COMPLETION_TOKENS: Decimal("12.00"),
    }
    names = [str(org) for org, _ in data["revenue"].top_organizations]
    assert names == [str(charlie.organization), str(alice.organization)]  # $12 before $6


def test_last_months_usage_is_not_this_months_revenue(
    alice: Person, base: BaseModel, prices: None
) -> None:
    now = timezone.now()
    ledger(alice, Meter.PROMPT_TOKENS, 1_000_000, now.replace(day=1) - timedelta(days=2))
    assert selectors.revenue_month_to_date(now=now).usage == Decimal("0.00")


def test_the_dashboard_costs_the_same_queries_whatever_the_data(
    staff: Client, alice: Person, charlie: Person, base: BaseModel, prices: None
) -> None:
    def queries() -> int:
        staff.get("/admin/dashboard/")
        with CaptureQueriesContext(connection) as captured:
            assert staff.get("/admin/dashboard/").status_code == 200
        return len(captured)

    seed(alice, charlie, base, 1)
    few = queries()
    seed(alice, charlie, base, 8)
    assert queries() == few


def test_the_admin_index_links_to_the_dashboard(staff: Client) -> None:
    page = staff.get("/admin/").content.decode()
    assert 'id="staff-dashboard" href="/admin/dashboard/"' in page


def test_only_staff_see_the_dashboard(alice: Person) -> None:
    assert Client().get("/admin/dashboard/")["Location"].startswith("/admin/login/")
    customer = Client()
    customer.force_login(alice.user)
    response = customer.get("/admin/dashboard/")
    assert response.status_code == 302
    assert response["Location"].startswith("/admin/login/")


def test_the_front_door_counts_the_requests_it_refuses(alice: Person) -> None:
    """An inference request refused before any worker ran it (no key, bad JSON) leaves no
    usage record; it is counted by status, so the dashboard's errors include it."""
    assert request_errors.errors_since(minutes=1) == {}
    response = serve("/v1/chat/completions", {"model": MODEL, "messages": []})
    assert response.status_code == 401
    bad = serve("/v1/chat/completions", content=b"{nope", key=alice.key)
    assert bad.status_code == 400
    assert request_errors.errors_since(minutes=1) == {400: 1, 401: 1}
    assert not UsageRecord.objects.dangerously_unscoped().exists()


def test_engagement_milestones_billed_this_month_are_revenue(
    staff: Client, alice: Person, base: BaseModel, prices: None
) -> None:
    """Milestones are billed in Stripe on their own (never through the month's usage
    invoice): the dashboard counts those billed this month, not last month's or unbilled."""
    from controlplane.engagements.models import Milestone, MilestoneStatus
    from tests.support.engagements import engagement_for

    engagement = engagement_for(alice)
    now = timezone.now()
    for title, amount, status, billed_at in (
        ("Prototype", "1500.00", MilestoneStatus.BILLED, now),
        ("Pilot", "250.00", MilestoneStatus.BILLED, now),
        ("Scoping", "99.00", MilestoneStatus.BILLED, now.replace(day=1) - timedelta(days=3)),
        ("Rollout", "5000.00", MilestoneStatus.ACCEPTED, None),
    ):
        Milestone.objects.create(
            organization=alice.organization,
            engagement=engagement,
            title=title,
            amount=Decimal(amount),
            status=status,
            billed_at=billed_at,
        )

    revenue = section(staff.get("/admin/dashboard/").content.decode(), "revenue-mtd")

    assert (cell(revenue, "milestones"), cell(revenue, "milestones-amount")) == ("2", "$1750.00")


def test_kinds_that_share_a_queue_are_one_row(alice: Person, base: BaseModel) -> None:
    """Evaluation jobs run on gpu.training beside fine-tuning: one row for the queue."""
    now = timezone.now()
    job(alice, base, JobStatus.RUNNING, dispatched_at=now)
    job(alice, base, JobStatus.RUNNING, kind=JobKind.EVALUATION, dispatched_at=now)

    rows = selectors.jobs_by_queue()

    assert [row.queue for row in rows] == ["gpu.training", "gpu.compression"]
    assert (rows[0].running, rows[1].running) == (2, 0)
