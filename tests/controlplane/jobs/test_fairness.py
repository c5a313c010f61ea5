"""Fair queueing: a tenant who submits 50 jobs cannot starve tenants who submit one."""

from __future__ import annotations

from typing import Any

import pytest

from controlplane.jobs.models import Job
from jobcontracts import training as contract
from tests.support.jobs import (
    TINY_LLAMA,
    Worker,
    chat_rows,
    create_job,
    register_tiny_llama,
    sent_specs,
    upload_file,
)
from tests.support.people import Person, sign_up
from tests.support.plans import set_plan

pytestmark = pytest.mark.django_db


def submit(person: Person, captured: Any, n: int) -> list[str]:
    file_id = upload_file(person, chat_rows(10), captured)
    ids = []
    for _ in range(n):
        response = create_job(person, captured, model=TINY_LLAMA, training_file=file_id)
        assert response.status_code == 200, response.content
        ids.append(response.json()["id"])
    return ids


def finish(job_id: str, captured: Any) -> None:
    """Play the GPU worker: the job runs and succeeds, freeing its tenant's slot."""
    attempt = Job.objects.dangerously_unscoped().get(pk=job_id).attempt
    worker = Worker(job_id, attempt)
    with captured(execute=True):
        worker.report(contract.STARTED, total_steps=1)
        worker.report(
            contract.SUCCEEDED, step=1, trained_tokens=5, artifact_uri=worker.uri("final")
        )


def test_a_tenant_with_50_jobs_does_not_starve_tenants_with_one(
    alice: Person, django_capture_on_commit_callbacks: Any, settings: Any
) -> None:
    captured = django_capture_on_commit_callbacks
    register_tiny_llama(real=True)
    set_plan("free", concurrent_fine_tuning_jobs=2)
    flood = submit(alice, captured, 50)
    bob = sign_up("bob@initech.test", "Initech")
    carol = sign_up("carol@umbrella.test", "Umbrella")
    (bobs,) = submit(bob, captured, 1)
    (carols,) = submit(carol, captured, 1)

    # Only Acme's plan's worth of its jobs reached the broker; the others' jobs follow at once.
    queue = [spec.job_id for spec in sent_specs()]
    assert queue == [flood[0], flood[1], bobs, carols]

    # GPU workers take messages in order; each finished Acme job lets the next one in.
    order: list[str] = []
    for _ in range(6):
        head = sent_specs()[0].job_id
        order.append(head)
        purge_broker_head()
        finish(head, captured)
    assert order.index(bobs) <= 2
    assert order.index(carols) <= 3
    assert order == [flood[0], flood[1], bobs, carols, flood[2], flood[3]]
    in_flight = Job.objects.for_organization(alice.organization).filter(
        dispatched_at__isnull=False, status__in=["queued", "running"]
    )
    assert in_flight.count() == 2  # never more than the plan allows


def purge_broker_head() -> None:
    """A worker took the oldest message."""
    import os

    import redis

    from jobcontracts import queues

    redis.Redis.from_url(os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/15")).rpop(
        queues.GPU_TRAINING
    )


def test_a_plan_sets_how_many_jobs_run_at_once(
    alice: Person, django_capture_on_commit_callbacks: Any, settings: Any
) -> None:
    register_tiny_llama(real=True)
    set_plan("free", concurrent_fine_tuning_jobs=1)
    set_plan("pro", concurrent_fine_tuning_jobs=3)
    submit(alice, django_capture_on_commit_callbacks, 5)
    assert len(sent_specs()) == 1

    alice.organization.plan = "pro"
    alice.organization.save()
    from controlplane.jobs import dispatch

    with django_capture_on_commit_callbacks(execute=True):
        dispatch.reap()
    assert len(sent_specs()) == 3
