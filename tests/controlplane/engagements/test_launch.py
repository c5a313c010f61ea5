"""Staff launch jobs for an engagement: estimated first, refused over budget, charged to the
engagement rather than to the customer's self-serve usage, hidden from the customer."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest
from django.utils import timezone

from controlplane.audit.models import AuditLog
from controlplane.billing.invoicing import invoice_preview
from controlplane.billing.models import LedgerEntry, Meter
from controlplane.core.errors import Conflict
from controlplane.engagements import selectors, services
from controlplane.engagements.estimates import compression_estimate, fine_tuning_estimate
from controlplane.engagements.models import Engagement, EngagementEvent
from controlplane.jobs import compression, params
from controlplane.jobs.models import Job, JobEvent, JobStatus
from controlplane.limits.spend import ledger_spend
from tests.support.engagements import actor_of, engagement_for
from tests.support.jobs import TINY_LLAMA, sent_compression_specs, sent_specs
from tests.support.people import Person

from .conftest import Launch, activated

pytestmark = pytest.mark.django_db


def _estimate(alice: Person, chat_file: str) -> Any:
    data = params.CreateJobInput(data={"model": TINY_LLAMA, "training_file": chat_file})
    assert data.is_valid(), data.errors
    return fine_tuning_estimate(organization=alice.organization, data=dict(data.validated_data))


def test_a_launched_job_runs_in_the_customers_organization_for_the_engagement(
    alice: Person, engagement: Engagement, launch: Launch, chat_file: str
) -> None:
    expected = _estimate(alice, chat_file)

    job = launch(engagement, suffix="bot")

    assert job.organization_id == alice.organization.pk
    assert job.engagement_id == engagement.pk
    assert job.created_by_id == engagement.owner_id
    assert job.status == JobStatus.QUEUED  # counted, priced and dispatched on commit
    assert job.estimated_tokens * job.hyperparameters["n_epochs"] == expected.tokens
    assert job.estimated_price == expected.amount
    assert expected.tokens > 40 * 10
    assert expected.amount > 0
    assert expected.gpu_seconds >= 30
    (spec,) = sent_specs()
    assert spec.job_id == job.pk
    assert [f.pk for f in engagement.files.all()] == [chat_file]
    entry = AuditLog.objects.for_organization(alice.organization).get(
        action="engagement.job_launched"
    )
    assert entry.details["job_id"] == job.pk
    assert entry.details["estimate"]["tokens"] == expected.tokens
    assert entry.actor_email == engagement.owner.email
    assert (
        EngagementEvent.objects.for_organization(alice.organization)
        .filter(engagement=engagement, kind="job")
        .exists()
    )


@pytest.mark.parametrize("budget", ["budget_tokens", "budget_gpu_seconds", "budget_amount"])
def test_a_job_over_any_budget_is_refused_and_nothing_is_created(
    alice: Person, engagement: Engagement, launch: Launch, chat_file: str, budget: str
) -> None:
    expected = _estimate(alice, chat_file)
    just_under = {
        "budget_tokens": expected.tokens - 1,
        "budget_gpu_seconds": expected.gpu_seconds - 1,
        "budget_amount": (expected.amount - Decimal("0.01")).quantize(Decimal("0.01")),
    }[budget]
    Engagement.objects.for_organization(alice.organization).filter(pk=engagement.pk).update(
        **{budget: just_under}
    )
    audits = AuditLog.objects.for_organization(alice.organization).count()
    events = EngagementEvent.objects.for_organization(alice.organization).count()

    with pytest.raises(Conflict) as refused:
        launch(engagement)

    assert refused.value.code == "budget_exceeded"
    assert "nothing was created" in str(refused.value.detail)
    assert not Job.objects.for_organization(alice.organization).exists()
    assert not JobEvent.objects.for_organization(alice.organization).exists()
    assert sent_specs() == []
    assert not engagement.files.exists()
    assert AuditLog.objects.for_organization(alice.organization).count() == audits
    assert EngagementEvent.objects.for_organization(alice.organization).count() == events


def test_a_job_that_fits_exactly_is_launched(
    alice: Person, engagement: Engagement, launch: Launch, chat_file: str
) -> None:
    expected = _estimate(alice, chat_file)
    Engagement.objects.for_organization(alice.organization).filter(pk=engagement.pk).update(
        budget_tokens=expected.tokens
    )
    assert launch(engagement).engagement_id == engagement.pk


def test_unfinished_jobs_commit_their_estimate_against_the_budget(
    alice: Person, engagement: Engagement, launch: Launch, chat_file: str
) -> None:
    expected = _estimate(alice, chat_file)
    Engagement.objects.for_organization(alice.organization).filter(pk=engagement.pk).update(
        budget_tokens=expected.tokens * 2 - 1
    )
    launch(engagement)

    with pytest.raises(Conflict, match="committed by 1 unfinished job"):
        launch(engagement)
    assert Job.objects.for_organization(alice.organization).count() == 1

    budget = selectors.engagement_budget(engagement)
    assert budget.committed.tokens == expected.tokens
    assert budget.spent.tokens == 0


def test_jobs_are_launched_only_for_an_active_engagement(
    alice: Person, staff: Any, launch: Launch
) -> None:
    lead = engagement_for(alice, owner=staff)
    with pytest.raises(Conflict, match="Move it to active first"):
        launch(lead)
    assert not Job.objects.for_organization(alice.organization).exists()


def test_another_organizations_file_is_not_found(
    alice: Person, charlie: Person, staff: Any, launch: Launch
) -> None:
    globex = activated(engagement_for(charlie, owner=staff))
    with pytest.raises(Exception, match="No file with id"):
        launch(globex)  # Acme's file, through Globex's engagement
    assert not Job.objects.for_organization(charlie.organization).exists()


def test_a_bad_request_is_refused_naming_the_field(
    alice: Person, engagement: Engagement, launch: Launch
) -> None:
    with pytest.raises(Exception, match="n_epochs"):
        launch(
            engagement,
            method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 0}}},
        )
    with pytest.raises(Exception, match="kind of job"):
        launch(engagement, kind="pretraining")
    assert not Job.objects.for_organization(alice.organization).exists()


def test_the_job_is_charged_to_the_engagement_not_to_self_serve_usage(
    alice: Person, engagement: Engagement, launch: Launch, succeed: Any
) -> None:
    job = succeed(launch(engagement))
    assert job.status == JobStatus.SUCCEEDED

    (entry,) = LedgerEntry.objects.for_organization(alice.organization).filter(
        meter=Meter.TRAINING_TOKENS
    )
    assert (entry.engagement_id, entry.reference, entry.quantity) == (engagement.pk, job.pk, 40)
    # The customer's invoice, budgets and usage and cost reports leave it out.
    preview = invoice_preview(organization=alice.organization)
    assert [line for line in preview.lines if line.meter == Meter.TRAINING_TOKENS] == []
    month = timezone.now() - timedelta(days=40)
    assert (
        ledger_spend(
            organization_id=alice.organization.pk,
            api_key_id=None,
            start=month,
            end=timezone.now() + timedelta(days=1),
        )
        == 0
    )
    start = int((timezone.now() - timedelta(days=1)).timestamp())
    usage = alice.client.get("/v1/organization/usage", {"start_time": start}).json()
    assert sum(r["training_tokens"] for b in usage["data"] for r in b["results"]) == 0
    costs = alice.client.get("/v1/organization/costs", {"start_time": start}).json()
    assert sum(r["amount"]["value"] for b in costs["data"] for r in b["results"]) == 0
    # The engagement's spend is it, priced at the price book's training price ($8 / 1M).
    spent = selectors.engagement_budget(engagement).spent
    assert spent.tokens == 40
    assert spent.amount == Decimal(40) * Decimal(8) / Decimal(1_000_000)


def test_self_serve_jobs_stay_on_the_customers_bill(
    alice: Person, chat_file: str, django_capture_on_commit_callbacks: Any, succeed: Any
) -> None:
    # The contrast to the test above: the same job run by the customer is billed to them.
    from tests.support.jobs import create_job

    job_id = create_job(
        alice, django_capture_on_commit_callbacks, model=TINY_LLAMA, training_file=chat_file
    ).json()["id"]
    succeed(Job.objects.dangerously_unscoped().get(pk=job_id))
    preview = invoice_preview(organization=alice.organization)
    assert [line.quantity for line in preview.lines if line.meter == Meter.TRAINING_TOKENS] == [40]


def test_gpu_seconds_spent_are_the_jobs_run_times(
    alice: Person, engagement: Engagement, launch: Launch, succeed: Any
) -> None:
    job = succeed(launch(engagement))
    Job.objects.for_organization(alice.organization).filter(pk=job.pk).update(
        started_at=job.finished_at - timedelta(seconds=90), gpus=2
    )
    budget = selectors.engagement_budget(engagement)
    assert budget.spent.gpu_seconds == 180
    assert budget.committed.gpu_seconds == 0  # finished: spent, no longer committed
    (row,) = selectors.with_spend(Engagement.objects.for_organization(alice.organization))
    assert int(row.spent_gpu_seconds) == 180  # type: ignore[attr-defined]


def test_the_customer_never_sees_the_engagements_jobs(
    alice: Person, engagement: Engagement, launch: Launch
) -> None:
    job = launch(engagement)

    assert alice.client.get("/v1/fine_tuning/jobs").json()["data"] == []
    for path in ("", "/events", "/checkpoints"):
        assert alice.client.get(f"/v1/fine_tuning/jobs/{job.pk}{path}").status_code == 404
    assert alice.client.post(f"/v1/fine_tuning/jobs/{job.pk}/cancel").status_code == 404
    assert Job.objects.for_organization(alice.organization).get().status == JobStatus.QUEUED


def test_a_compression_job_is_estimated_with_the_compression_estimate(
    alice: Person, engagement: Engagement, launch: Launch
) -> None:
    data = compression.CreateCompressionJobInput(data={"model": TINY_LLAMA, "method": "quantize"})
    assert data.is_valid()
    expected = compression_estimate(
        organization=alice.organization, data=dict(data.validated_data), engagement_id=engagement.pk
    )

    job = launch(engagement, kind="compression", method="quantize")

    assert (job.kind, job.engagement_id) == ("compression", engagement.pk)
    assert job.estimated_price == expected.amount == Decimal("2.000000")
    assert job.estimated_seconds == expected.gpu_seconds
    (spec,) = sent_compression_specs()
    assert spec.job_id == job.pk
    assert alice.client.get(f"/v1/compression/jobs/{job.pk}").status_code == 404
    assert alice.client.get("/v1/compression/jobs").json()["data"] == []


def test_a_compression_over_the_money_budget_is_refused(
    alice: Person, engagement: Engagement, launch: Launch
) -> None:
    Engagement.objects.for_organization(alice.organization).filter(pk=engagement.pk).update(
        budget_amount=Decimal("1.99")
    )
    with pytest.raises(Conflict, match="money budget"):
        launch(engagement, kind="compression", method="quantize")
    assert not Job.objects.for_organization(alice.organization).exists()
    assert sent_compression_specs() == []


def test_the_engagement_compresses_its_own_undelivered_model_the_customer_cannot(
    alice: Person, engagement: Engagement, launch: Launch, succeed: Any, staff: Any
) -> None:
    tuned = succeed(launch(engagement, suffix="bot"))
    model_id = tuned.fine_tuned_model

    job = launch(engagement, kind="compression", model=model_id, method="quantize")
    assert job.source_model_id == model_id

    response = alice.client.post(
        "/v1/compression/jobs", {"model": model_id, "method": "quantize"}, format="json"
    )
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "model_not_found"
    # Another engagement of the same customer cannot use it either.
    other = activated(engagement_for(alice, owner=staff, title="Other"))
    with pytest.raises(Exception, match="does not exist"):
        services.engagement_job_launch(
            engagement=other,
            kind="compression",
            data={"model": model_id, "method": "quantize"},
            actor=actor_of(staff),
        )


def test_a_retried_engagement_job_is_checked_against_the_budget_like_a_launch(
    alice: Person, engagement: Engagement, launch: Launch, chat_file: str
) -> None:
    """The job admin's retry (jobs.services.job_retry) runs the engagement's check: a
    cancelled job whose estimate no longer fits is refused and nothing is created; with
    room it becomes a new job of the same engagement."""
    from controlplane.jobs.services import job_cancel, job_retry

    expected = _estimate(alice, chat_file)
    job = job_cancel(job=launch(engagement))
    rows = Engagement.objects.for_organization(alice.organization).filter(pk=engagement.pk)
    rows.update(budget_tokens=expected.tokens - 1)

    with pytest.raises(Conflict) as refused:
        job_retry(job=job)
    assert refused.value.code == "budget_exceeded"
    assert Job.objects.for_organization(alice.organization).count() == 1

    rows.update(budget_tokens=expected.tokens, status="delivered")
    with pytest.raises(Conflict, match="Move it to active first"):
        job_retry(job=job)
    assert Job.objects.for_organization(alice.organization).count() == 1

    rows.update(status="active")
    retry = job_retry(job=job)
    assert retry.pk != job.pk
    assert retry.engagement_id == engagement.pk
