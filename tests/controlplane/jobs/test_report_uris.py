"""Storage URIs in worker reports must lie under the job's own prefix, or nothing is stored."""

from __future__ import annotations

from typing import Any

import pytest
from structlog.testing import capture_logs

from controlplane.datasets.storage import object_uri
from controlplane.jobs.models import Job, JobCheckpoint, JobEvent
from controlplane.jobs.reports import uri_under
from controlplane.modelregistry.models import CustomerModel
from jobcontracts import training as contract
from tests.support.jobs import (
    TINY_LLAMA,
    Worker,
    chat_rows,
    create_job,
    register_tiny_llama,
    upload_file,
)
from tests.support.people import Person

pytestmark = pytest.mark.django_db


@pytest.fixture
def worker(alice: Person, django_capture_on_commit_callbacks: Any) -> Worker:
    """The worker of a running job of Alice's."""
    register_tiny_llama()
    captured = django_capture_on_commit_callbacks
    file_id = upload_file(alice, chat_rows(20), captured)
    job_id = create_job(alice, captured, model=TINY_LLAMA, training_file=file_id).json()["id"]
    worker = Worker(job_id, 1)
    worker.report(contract.STARTED, total_steps=4)
    return worker


def job(worker: Worker) -> Job:
    return Job.objects.dangerously_unscoped().get(pk=worker.job_id)


#: Each builds a URI from the job's own prefix (`…/jobs/<org>/<job>`): none is under it.
FOREIGN = {
    "other-org": lambda own, w: object_uri(f"jobs/org_someone_else/{w.job_id}/final"),
    "other-job": lambda own, w: object_uri(f"jobs/{job(w).organization_id}/ftjob-other/final"),
    "traversal": lambda own, w: f"{own}/../../org_someone_else/ftjob-x/final",
    "encoded-traversal": lambda own, w: f"{own}/%2e%2e/%2E%2E/org_someone_else/final",
    "encoded-slash": lambda own, w: f"{own}/..%2f..%2fother",
    "sibling-prefix": lambda own, w: f"{own}-evil/final",
    "the-prefix-itself": lambda own, w: own,
    "other-scheme": lambda own, w: "s3://atelier" + own.removeprefix("file://") + "/final",
    "other-host": lambda own, w: own.replace("file:///", "file://evil.example/", 1) + "/final",
    "query": lambda own, w: f"{own}/final?versionId=1",
    "not-a-string": lambda own, w: ["file:///x"],
}


@pytest.mark.parametrize("case", FOREIGN)
def test_a_success_report_with_a_foreign_artifact_uri_is_refused_and_not_stored(
    alice: Person, worker: Worker, case: str
) -> None:
    own = worker.uri()
    bad = FOREIGN[case](own, worker)
    with capture_logs() as logs:
        outcome = worker.report(contract.SUCCEEDED, step=4, trained_tokens=40, artifact_uri=bad)

    assert outcome == "refused"
    refused = job(worker)
    assert refused.status == "running"
    assert refused.fine_tuned_model == ""
    assert not CustomerModel.objects.for_organization(alice.organization).exists()
    event = JobEvent.objects.for_organization(alice.organization).get(job=refused, seq=1)
    assert event.level == "warn"
    assert "artifact_uri" in event.message
    assert "refused" in event.message
    (warning,) = [e for e in logs if e["event"] == "jobs.report_refused"]
    assert warning["log_level"] == "warning"
    assert (warning["job_id"], warning["kind"]) == (worker.job_id, contract.SUCCEEDED)
    assert (warning["field"], warning["uri"], warning["prefix"]) == ("artifact_uri", repr(bad), own)


@pytest.mark.parametrize(
    ("kind", "field"),
    [(contract.CHECKPOINT, "uri"), (contract.PAUSED, "checkpoint_uri")],
)
def test_a_checkpoint_outside_the_jobs_prefix_is_refused_and_never_resumed_from(
    alice: Person, worker: Worker, kind: str, field: str
) -> None:
    other = object_uri("jobs/org_someone_else/ftjob-x/checkpoints/step-00000002")
    assert worker.report(kind, step=2, metrics={}, **{field: other}) == "refused"
    refused = job(worker)
    assert refused.last_checkpoint_uri == ""
    assert refused.status == "running"
    assert not JobCheckpoint.objects.for_organization(alice.organization).exists()
    # Delivered again, it is a duplicate of the refused report: still nothing stored.
    worker.seq -= 1
    assert worker.report(kind, step=2, metrics={}, **{field: other}) == "duplicate"
    assert not JobCheckpoint.objects.for_organization(alice.organization).exists()


def test_uris_under_the_jobs_own_prefix_are_stored(alice: Person, worker: Worker) -> None:
    checkpoint = worker.uri("checkpoints", "step-00000002")
    final = worker.uri("final")
    assert worker.report(contract.CHECKPOINT, step=2, uri=checkpoint, metrics={}) == "applied"
    assert worker.report(contract.SUCCEEDED, step=4, trained_tokens=40, artifact_uri=final) == (
        "applied"
    )
    done = job(worker)
    assert done.status == "succeeded"
    assert done.last_checkpoint_uri == checkpoint
    (stored,) = JobCheckpoint.objects.for_organization(alice.organization)
    assert stored.uri == checkpoint
    model = CustomerModel.objects.for_organization(alice.organization).get(pk=done.fine_tuned_model)
    assert model.uri == final


def test_uri_under_accepts_plain_segments_below_the_prefix_only() -> None:
    prefix = "s3://bucket/jobs/org_a/ftjob-1"
    assert uri_under(f"{prefix}/final", prefix)
    assert uri_under(f"{prefix}/checkpoints/step-00000002", prefix)
    assert uri_under(f"{prefix}/final", prefix + "/")
    for bad in (
        "s3://other-bucket/jobs/org_a/ftjob-1/final",
        "S3://bucket/jobs/org_a/ftjob-1/final/../../ftjob-2",
        f"{prefix}//final",
        f"{prefix}/./final",
        f"{prefix}/final/",
        f"{prefix}/a%5c..%5cb",
        f"{prefix}/a%00",
        f"{prefix}/final#x",
        "file:///jobs/org_a/ftjob-1/final",
        "",
    ):
        assert not uri_under(bad, prefix), bad
