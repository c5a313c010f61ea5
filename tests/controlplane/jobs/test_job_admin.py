"""Staff on a job's admin pages: the list, the live status, the loss and report charts,
Cancel and Retry (audited), and who may not see any of it."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from typing import Any

import pytest
from django.contrib.auth.models import Permission
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from controlplane.accounts.models import User
from controlplane.audit.models import AuditLog
from controlplane.core.ids import new_compression_job_id
from controlplane.datasets.models import File
from controlplane.jobs.models import Job, JobCheckpoint, JobEvent, JobKind, JobStatus
from controlplane.modelregistry.models import BaseModel
from jobcontracts import training as contract
from tests.support.jobs import (
    TINY_LLAMA,
    Worker,
    chat_rows,
    create_job,
    register_tiny_llama,
    sent_compression_specs,
    sent_specs,
    upload_file,
)
from tests.support.people import Person

pytestmark = pytest.mark.django_db

SVG = "{http://www.w3.org/2000/svg}"
REPORT = {
    "method": "quantize",
    "device": "cpu",
    "quality_metric": "perplexity",
    "source": {
        "parameters": 1_000_000,
        "file_bytes": 4_000_000,
        "peak_memory_bytes": 9_000_000,
        "latency_ms_p50_batch1": 8.0,
        "latency_ms_p50_batch16": 40.0,
        "quality": 9.0,
    },
    "result": {
        "parameters": 1_000_000,
        "file_bytes": 1_300_000,
        "peak_memory_bytes": 3_000_000,
        "latency_ms_p50_batch1": 6.0,
        "latency_ms_p50_batch16": 25.0,
        "quality": 9.4,
    },
}


@pytest.fixture
def staff_user(db: None) -> User:
    return User.objects.create_superuser(email="ops@atelier.test", password="staff pass 12345")


@pytest.fixture
def staff(staff_user: User) -> Client:
    client = Client()
    client.force_login(staff_user)
    return client


@pytest.fixture
def base(db: None) -> BaseModel:
    model: BaseModel = register_tiny_llama(real=False)
    return model


def a_job(person: Person, base: BaseModel, **fields: Any) -> Job:
    defaults: dict[str, Any] = {
        "organization": person.organization,
        "base_model": base,
        "seed": 1,
        "status": JobStatus.QUEUED,
        "hyperparameters": {"n_epochs": 1, "batch_size": 1, "learning_rate_multiplier": 1.0},
    }
    if fields.get("kind") == JobKind.COMPRESSION:
        defaults["id"] = new_compression_job_id()
        defaults["method"] = "quantize"
    return Job.objects.create(**{**defaults, **fields})  # type: ignore[no-any-return]


def running(person: Person, base: BaseModel) -> tuple[Job, Worker]:
    """A job a (played) worker has started: attempt 1, in flight; and that worker."""
    from django.utils import timezone

    job = a_job(person, base, status=JobStatus.QUEUED, attempt=1, dispatched_at=timezone.now())
    worker = Worker(job.pk, 1)
    worker.report(contract.STARTED, total_steps=10)
    return job, worker


def change_url(job: Job) -> str:
    return reverse("admin:jobs_job_change", args=[job.pk])


def status_url(job: Job) -> str:
    return f"/admin/jobs/job/{job.pk}/status/"


def action_url(job: Job) -> str:
    return f"/admin/jobs/job/{job.pk}/action/"


def svg(html: bytes, element_id: str) -> ET.Element:
    match = re.search(rb'<svg[^>]*id="' + element_id.encode() + rb'".*?</svg>', html, re.S)
    assert match, f"no svg#{element_id} on the page"
    return ET.fromstring(match.group(0))  # parsed as XML: well-formed


def series_points(chart: ET.Element) -> dict[str, int]:
    out = {}
    for group in chart.iter(f"{SVG}g"):
        if group.get("class") == "series":
            d = group.find(f"{SVG}path").get("d", "")  # type: ignore[union-attr]
            out[group.get("data-name", "")] = len(re.findall(r"[ML]", d))
    return out


# --- the change page --------------------------------------------------------------------------


def test_the_job_page_draws_training_and_validation_loss_from_the_workers_reports(
    staff: Client, alice: Person, base: BaseModel
) -> None:
    job, worker = running(alice, base)
    for step, loss in enumerate([2.0, 1.7, 1.5, 1.4, 1.3], start=1):
        worker.report(contract.PROGRESS, step=step, total_steps=10, train_loss=loss)
    worker.report(contract.METRICS, step=2, valid_loss=1.9, valid_mean_token_accuracy=0.4)
    worker.report(contract.METRICS, step=4, valid_loss=1.6, valid_mean_token_accuracy=0.5)
    # A checkpoint's metrics fill a step the events lack (step 6 of validation).
    JobCheckpoint.objects.create(
        organization=alice.organization,
        job=job,
        step_number=6,
        metrics={"valid_loss": 1.55},
        uri="file:///x",
        fine_tuned_model_checkpoint="ft:x:ckpt-step-6",
    )

    response = staff.get(change_url(job))

    assert response.status_code == 200
    html = response.content
    assert b'id="job-status"' in html
    assert re.search(rb'id="job-status"[^>]*>running<', html)
    chart = svg(html, "loss-chart")
    assert series_points(chart) == {"Training loss": 5, "Validation loss": 3}
    assert not re.search(rb'id="report-chart"', html)  # a fine-tuning job has no report
    assert b'name="job_action" value="cancel"' in html
    assert b'name="job_action" value="retry"' not in html  # running: nothing to retry
    assert b'name="_save"' not in html  # every field is read-only: nothing to save


def test_a_step_redone_by_a_later_attempt_is_drawn_once_at_the_later_value(
    staff: Client, alice: Person, base: BaseModel
) -> None:
    job, worker = running(alice, base)
    worker.report(contract.PROGRESS, step=1, total_steps=10, train_loss=2.0)
    worker.report(contract.PROGRESS, step=2, total_steps=10, train_loss=1.8)
    job.refresh_from_db()
    job.attempt = 2  # the first attempt was lost after step 2; the next resumes from step 1
    job.save()
    second = Worker(job.pk, 2)
    second.report(contract.PROGRESS, step=2, total_steps=10, train_loss=5.0)
    second.report(contract.PROGRESS, step=3, total_steps=10, train_loss=1.6)

    chart = svg(staff.get(change_url(job)).content, "loss-chart")

    assert series_points(chart) == {"Training loss": 3, "Validation loss": 0}
    from controlplane.jobs.selectors import loss_curves

    (train, _) = loss_curves(job)
    assert list(train.points) == [(1.0, 2.0), (2.0, 5.0), (3.0, 1.6)]


def test_a_job_without_metrics_says_so(staff: Client, alice: Person, base: BaseModel) -> None:
    job = a_job(alice, base)
    chart = svg(staff.get(change_url(job)).content, "loss-chart")
    assert "No data yet" in [t.text for t in chart.iter(f"{SVG}text")]


def test_a_compression_jobs_report_is_drawn_before_and_after(
    staff: Client, alice: Person, base: BaseModel
) -> None:
    job = a_job(alice, base, kind=JobKind.COMPRESSION, status=JobStatus.SUCCEEDED, report=REPORT)

    html = staff.get(change_url(job)).content

    chart = svg(html, "report-chart")
    groups = [g for g in chart.iter(f"{SVG}g") if g.get("class") == "group"]
    assert [g.get("data-label") for g in groups] == [
        "Parameters",
        "File size",
        "Peak memory",
        "Latency p50 b1",
        "Latency p50 b16",
        "Quality (perplexity)",
    ]
    keys = [
        "parameters",
        "file_bytes",
        "peak_memory_bytes",
        "latency_ms_p50_batch1",
        "latency_ms_p50_batch16",
        "quality",
    ]
    for group, key in zip(groups, keys, strict=True):
        bars = group.findall(f"{SVG}rect")
        assert [b.get("data-series") for b in bars] == ["Before (source)", "After (result)"]
        assert [float(b.get("data-value", "")) for b in bars] == [
            REPORT["source"][key],  # type: ignore[index]
            REPORT["result"][key],  # type: ignore[index]
        ]
    labels = [t.text for t in chart.iter(f"{SVG}text")]
    assert {"4 MB", "1.3 MB", "8 ms", "6 ms"} <= set(labels)
    svg(html, "loss-chart")  # the compression job's (recovery) loss chart is there too


def test_a_compression_job_still_running_has_no_report_yet(
    staff: Client, alice: Person, base: BaseModel
) -> None:
    job = a_job(alice, base, kind=JobKind.COMPRESSION)
    chart = svg(staff.get(change_url(job)).content, "report-chart")
    assert "No report yet" in [t.text for t in chart.iter(f"{SVG}text")]


def test_the_page_lists_the_newest_events_only(
    staff: Client, alice: Person, base: BaseModel
) -> None:
    job = a_job(alice, base)
    for i in range(60):
        JobEvent.objects.create(organization=alice.organization, job=job, message=f"note-{i:02d}")

    html = staff.get(change_url(job)).content.decode()

    shown = re.findall(r"note-(\d\d)", html)
    assert sorted(set(shown)) == [f"{i:02d}" for i in range(10, 60)]
    assert shown.index("59") < shown.index("10")  # newest first


# --- the live status ----------------------------------------------------------------------------


def test_the_status_view_returns_status_tokens_and_the_newest_events(
    staff: Client, alice: Person, base: BaseModel
) -> None:
    job, worker = running(alice, base)
    worker.report(contract.PROGRESS, step=3, total_steps=10, train_loss=1.0)
    for i in range(25):
        JobEvent.objects.create(organization=alice.organization, job=job, message=f"note {i}")

    response = staff.get(status_url(job))

    assert response.status_code == 200
    assert response["Content-Type"] == "application/json"
    assert "no-store" in response["Cache-Control"]  # never cached: it is live
    body = response.json()
    assert body["status"] == "running"
    assert body["trained_tokens"] is None
    assert (body["current_step"], body["total_steps"]) == (3, 10)
    assert len(body["events"]) == 20
    assert body["events"][0]["message"] == "note 24"
    assert set(body["events"][0]) == {"id", "created_at", "level", "type", "message"}

    job.status, job.trained_tokens = JobStatus.SUCCEEDED, 4321
    job.save()
    done = staff.get(status_url(job)).json()
    assert (done["status"], done["trained_tokens"]) == ("succeeded", 4321)


def test_the_status_of_an_unknown_job_is_a_404(staff: Client, db: None) -> None:
    assert staff.get("/admin/jobs/job/ftjob-nope/status/").status_code == 404


# --- cancel and retry -----------------------------------------------------------------------------


def test_staff_cancel_a_job_from_its_page_and_it_is_audited(
    staff: Client, staff_user: User, alice: Person, base: BaseModel
) -> None:
    job, _ = running(alice, base)

    response = staff.post(action_url(job), {"job_action": "cancel"}, follow=True)

    assert response.status_code == 200
    job.refresh_from_db()
    assert job.status == JobStatus.CANCELLED
    assert job.signal_action == "cancel"  # the worker is told to stop
    (entry,) = AuditLog.objects.for_organization(alice.organization).filter(
        action="admin.fine_tuning_job.cancelled"
    )
    assert (entry.actor_type, entry.actor_email) == ("staff", staff_user.email)
    assert (entry.target_type, entry.target_id) == ("fine_tuning_job", job.pk)
    assert b"Cancelled" in response.content

    again = staff.post(action_url(job), {"job_action": "cancel"}, follow=True)
    assert b"already cancelled" in again.content
    assert (
        AuditLog.objects.for_organization(alice.organization)
        .filter(action="admin.fine_tuning_job.cancelled")
        .count()
        == 1
    )


def test_the_action_view_takes_posts_only_and_known_actions(
    staff: Client, alice: Person, base: BaseModel
) -> None:
    job = a_job(alice, base)
    assert staff.get(action_url(job)).status_code == 405
    unknown = staff.post(action_url(job), {"job_action": "delete"}, follow=True)
    assert b"Unknown action" in unknown.content
    job.refresh_from_db()
    assert job.status == JobStatus.QUEUED
    assert (
        not AuditLog.objects.for_organization(alice.organization)
        .filter(action__startswith="admin.")
        .exists()
    )


@pytest.fixture
def failed_job(alice: Person, django_capture_on_commit_callbacks: Any) -> Job:
    register_tiny_llama()
    file_id = upload_file(alice, chat_rows(30), django_capture_on_commit_callbacks)
    response = create_job(
        alice,
        django_capture_on_commit_callbacks,
        model=TINY_LLAMA,
        training_file=file_id,
        suffix="support",
        seed=7,
        metadata={"team": "care"},
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2}}},
    )
    assert response.status_code == 200, response.content
    job = Job.objects.dangerously_unscoped().get(pk=response.json()["id"])
    assert job.attempt == 1
    Worker(job.pk, 1).report(contract.FAILED, code="oom", message="Out of memory", retryable=False)
    job.refresh_from_db()
    assert job.status == JobStatus.FAILED
    return job


def test_staff_retry_a_failed_job_as_a_new_job_with_the_same_inputs(
    staff: Client,
    staff_user: User,
    alice: Person,
    failed_job: Job,
    django_capture_on_commit_callbacks: Any,
) -> None:
    before = sent_specs()
    with django_capture_on_commit_callbacks(execute=True):
        response = staff.post(action_url(failed_job), {"job_action": "retry"})

    retry = Job.objects.dangerously_unscoped().exclude(pk=failed_job.pk).get()
    assert response.status_code == 302
    assert response["Location"] == change_url(retry)
    # Same inputs; checked, priced and queued again as a new job.
    for field in (
        "organization_id",
        "kind",
        "base_model_id",
        "training_file_id",
        "validation_file_id",
        "dataset_version_id",
        "suffix",
        "seed",
        "metadata",
        "task",
        "method",
        "requested_hyperparameters",
        "hyperparameters",
        "adapter",
        "gpus",
        "estimated_tokens",
        "estimated_price",
        "created_by_id",
        "engagement_id",
    ):
        assert getattr(retry, field) == getattr(failed_job, field), field
    assert retry.status == JobStatus.QUEUED
    assert (retry.attempt, retry.error) == (1, None)
    assert [s.job_id for s in sent_specs()] == [*[s.job_id for s in before], retry.pk]
    # The failed job is left as it was, and each names the other.
    failed_job.refresh_from_db()
    assert failed_job.status == JobStatus.FAILED
    assert failed_job.error["code"] == "oom"  # type: ignore[index]
    assert (
        JobEvent.objects.for_organization(alice.organization)
        .filter(job=failed_job, data__retried_as=retry.pk)
        .exists()
    )
    assert (
        JobEvent.objects.for_organization(alice.organization)
        .filter(job=retry, data__retry_of=failed_job.pk)
        .exists()
    )
    (entry,) = AuditLog.objects.for_organization(alice.organization).filter(
        action="admin.fine_tuning_job.retried"
    )
    assert entry.actor_email == staff_user.email
    assert (entry.target_id, entry.details) == (failed_job.pk, {"retry": retry.pk})
    # The customer sees the new job in their list.
    listed = [j["id"] for j in alice.client.get("/v1/fine_tuning/jobs").json()["data"]]
    assert retry.pk in listed


def test_a_retry_is_checked_as_a_new_job_is_and_refused_when_its_file_is_gone(
    staff: Client, alice: Person, failed_job: Job
) -> None:
    from django.utils import timezone

    File.objects.for_organization(alice.organization).filter(pk=failed_job.training_file_id).update(
        deleted_at=timezone.now()
    )

    response = staff.post(action_url(failed_job), {"job_action": "retry"}, follow=True)

    assert b"Refused" in response.content
    assert b"No file with id" in response.content
    assert Job.objects.dangerously_unscoped().count() == 1
    assert (
        not AuditLog.objects.for_organization(alice.organization)
        .filter(action="admin.fine_tuning_job.retried")
        .exists()
    )


def test_only_a_failed_or_cancelled_job_can_be_retried(
    staff: Client, alice: Person, base: BaseModel
) -> None:
    for status in (JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.SUCCEEDED):
        job = a_job(alice, base, status=status)
        page = staff.get(change_url(job)).content
        assert b'value="retry"' not in page
        response = staff.post(action_url(job), {"job_action": "retry"}, follow=True)
        assert b"only a failed or cancelled job can be retried" in response.content
    assert Job.objects.dangerously_unscoped().count() == 3
    assert (
        not AuditLog.objects.for_organization(alice.organization)
        .filter(action__startswith="admin.")
        .exists()
    )


def test_a_cancelled_compression_job_is_retried_as_a_compression_job(
    staff: Client, alice: Person, django_capture_on_commit_callbacks: Any
) -> None:
    register_tiny_llama()
    with django_capture_on_commit_callbacks(execute=True):
        created = alice.client.post(
            "/v1/compression/jobs",
            {"model": TINY_LLAMA, "method": "quantize", "options": {"weights": "int8"}},
            format="json",
        )
    assert created.status_code == 200, created.content
    job = Job.objects.dangerously_unscoped().get(pk=created.json()["id"])
    staff.post(action_url(job), {"job_action": "cancel"})
    job.refresh_from_db()
    assert job.status == JobStatus.CANCELLED

    with django_capture_on_commit_callbacks(execute=True):
        staff.post(action_url(job), {"job_action": "retry"})

    retry = Job.objects.dangerously_unscoped().exclude(pk=job.pk).get()
    assert retry.pk.startswith("cmpjob-")
    assert (retry.kind, retry.method, retry.status) == ("compression", "quantize", "queued")
    assert retry.requested_hyperparameters == job.requested_hyperparameters
    assert retry.estimated_price == job.estimated_price
    assert sent_compression_specs()[-1].job_id == retry.pk
    actions = set(
        AuditLog.objects.for_organization(alice.organization)
        .filter(action__startswith="admin.")
        .values_list("action", flat=True)
    )
    assert actions == {"admin.compression_job.cancelled", "admin.compression_job.retried"}


# --- who may see it -----------------------------------------------------------------------------


def test_anonymous_and_customers_get_no_job_pages(alice: Person, base: BaseModel) -> None:
    job = a_job(alice, base)
    customer = Client()
    customer.force_login(alice.user)
    for client in (Client(), customer):
        for url in (change_url(job), status_url(job), "/admin/jobs/job/"):
            response = client.get(url)
            assert response.status_code == 302, url
            assert response["Location"].startswith("/admin/login/")
        posted = client.post(action_url(job), {"job_action": "cancel"})
        assert posted.status_code == 302
    job.refresh_from_db()
    assert job.status == JobStatus.QUEUED


def test_staff_without_the_job_permissions_are_refused(alice: Person, base: BaseModel) -> None:
    job = a_job(alice, base)
    clerk = User.objects.create_user(email="clerk@atelier.test", password="clerk pass 12345")
    clerk.is_staff = True
    clerk.save()
    client = Client()
    client.force_login(clerk)

    assert client.get(status_url(job)).status_code == 403
    assert client.get(change_url(job)).status_code == 403
    assert client.post(action_url(job), {"job_action": "cancel"}).status_code == 403

    # Allowed to look, not to act.
    clerk.user_permissions.add(Permission.objects.get(codename="view_job"))
    client.force_login(User.objects.get(pk=clerk.pk))
    assert client.get(status_url(job)).status_code == 200
    page = client.get(change_url(job)).content
    assert b'name="job_action"' not in page
    assert client.post(action_url(job), {"job_action": "cancel"}).status_code == 403
    job.refresh_from_db()
    assert job.status == JobStatus.QUEUED
    assert (
        not AuditLog.objects.for_organization(alice.organization)
        .filter(action__startswith="admin.")
        .exists()
    )


# --- the list -----------------------------------------------------------------------------------


def seed_jobs(person: Person, base: BaseModel, n: int) -> None:
    from django.utils import timezone

    for i in range(n):
        kind = JobKind.COMPRESSION if i % 3 == 0 else JobKind.FINE_TUNING
        a_job(
            person,
            base,
            kind=kind,
            status=JobStatus.RUNNING if i % 2 else JobStatus.SUCCEEDED,
            suffix=f"s{i}",
            current_step=i,
            total_steps=20,
            trained_tokens=None if i % 2 else 1000 + i,
            started_at=timezone.now(),
        )


@pytest.mark.parametrize(
    "query", ["", "?q=s1", "?status__exact=running&kind__exact=fine_tuning", "?queue=gpu.training"]
)
def test_the_job_list_costs_the_same_queries_for_3_or_12_jobs(
    staff: Client, alice: Person, charlie: Person, base: BaseModel, query: str
) -> None:
    def queries() -> int:
        staff.get("/admin/jobs/job/" + query)  # warm (session, content types)
        with CaptureQueriesContext(connection) as captured:
            response = staff.get("/admin/jobs/job/" + query)
        assert response.status_code == 200
        return len(captured)

    seed_jobs(alice, base, 2)
    seed_jobs(charlie, base, 1)
    few = queries()
    seed_jobs(alice, base, 6)
    seed_jobs(charlie, base, 3)
    assert Job.objects.dangerously_unscoped().count() == 12
    assert queries() == few


def test_the_job_list_answers_whose_what_how_far_and_how_much(
    staff: Client, alice: Person, base: BaseModel
) -> None:
    from datetime import timedelta
    from decimal import Decimal

    from django.utils import timezone

    now = timezone.now()
    a_job(
        alice,
        base,
        status=JobStatus.RUNNING,
        current_step=5,
        total_steps=20,
        estimated_price=Decimal("1.234567"),
        suffix="support-bot",
        started_at=now - timedelta(minutes=3, seconds=5),
    )
    a_job(alice, base, kind=JobKind.COMPRESSION, status=JobStatus.SUCCEEDED, trained_tokens=12345)

    page = staff.get("/admin/jobs/job/").content.decode()

    assert "Acme" in page
    assert "step 5/20 (25%)" in page
    assert "12,345 tokens" in page
    assert "1.234567" in page
    assert re.search(r"3m 0[5-9]s", page)
    assert TINY_LLAMA in page
    searched = staff.get("/admin/jobs/job/?q=support-bot").content.decode()
    assert "step 5/20" in searched
    assert "12,345 tokens" not in searched
    by_queue = staff.get("/admin/jobs/job/?queue=gpu.compression").content.decode()
    assert "12,345 tokens" in by_queue
    assert "step 5/20" not in by_queue
