from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from controlplane.accounts.models import User
from controlplane.engagements import services
from controlplane.engagements.models import Engagement
from controlplane.jobs.models import Job
from controlplane.modelregistry.models import BaseModel
from tests.controlplane.jobs.test_jobs import run_to_success
from tests.support.engagements import actor_of, engagement_for, staff_member
from tests.support.jobs import TINY_LLAMA, chat_rows, purge_broker, register_tiny_llama, upload_file
from tests.support.localstripe import localstripe, stripe_settings  # noqa: F401
from tests.support.people import Person


@pytest.fixture(autouse=True)
def _empty_job_queues() -> Iterator[None]:
    """Launched jobs go to the (real) broker: every test starts and ends with empty queues."""
    purge_broker()
    yield
    purge_broker()


@pytest.fixture
def base(db: None) -> BaseModel:
    model: BaseModel = register_tiny_llama()
    return model


@pytest.fixture
def chat_file(alice: Person, base: BaseModel, django_capture_on_commit_callbacks: Any) -> str:
    return upload_file(alice, chat_rows(40), django_capture_on_commit_callbacks)


@pytest.fixture
def staff(db: None) -> User:
    return staff_member()


def activated(engagement: Engagement) -> Engagement:
    """The engagement moved to active directly (the pipeline has its own tests)."""
    rows = Engagement.objects.for_organization(engagement.organization_id)
    rows.filter(pk=engagement.pk).update(status="active")
    return rows.get(pk=engagement.pk)


@pytest.fixture
def engagement(alice: Person, staff: User) -> Engagement:
    """Acme's engagement, active (the work is agreed), with a roomy budget."""
    return activated(engagement_for(alice, owner=staff))


Launch = Callable[..., Job]


@pytest.fixture
def launch(staff: User, chat_file: str, django_capture_on_commit_callbacks: Any) -> Launch:
    """Launch a fine-tuning job (or, with kind=, another) for an engagement, running the
    on-commit work (token counting, dispatch) as the control worker would."""

    def run(engagement: Engagement, kind: str = "fine_tuning", **data: Any) -> Job:
        body = {"model": TINY_LLAMA, "training_file": chat_file, **data}
        if kind == "compression":
            body.pop("training_file")
        with django_capture_on_commit_callbacks(execute=True):
            job = services.engagement_job_launch(
                engagement=engagement, kind=kind, data=body, actor=actor_of(staff)
            )
        return Job.objects.dangerously_unscoped().get(pk=job.pk)

    return run


@pytest.fixture
def succeed(django_capture_on_commit_callbacks: Any) -> Callable[[Job], Job]:
    """Play the worker's reports of a fine-tuning job to its success (tests/controlplane/jobs)."""

    def run(job: Job) -> Job:
        with django_capture_on_commit_callbacks(execute=True):
            run_to_success(job.pk, attempt=job.attempt)
        return Job.objects.dangerously_unscoped().get(pk=job.pk)

    return run
