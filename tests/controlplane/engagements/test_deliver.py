"""A model an engagement made is the customer's only once staff deliver it, into its own
organization: until then it is not listed, not callable and not deployed."""

from __future__ import annotations

from typing import Any

import pytest

from controlplane.audit.models import AuditLog
from controlplane.core.errors import ApiError, Conflict, NotFound
from controlplane.engagements import services
from controlplane.engagements.models import Engagement
from controlplane.inference.models import Deployment
from controlplane.jobs.models import Job
from controlplane.modelregistry.models import CustomerModel
from controlplane.serving.gateway import model_ref
from tests.support.engagements import actor_of, engagement_for
from tests.support.people import Person

from .conftest import Launch, activated

pytestmark = pytest.mark.django_db


def listed(person: Person) -> set[str]:
    return {m["id"] for m in person.client.get("/v1/models").json()["data"]}


@pytest.fixture
def made(engagement: Engagement, launch: Launch, succeed: Any) -> Job:
    """A fine-tuning job of the engagement that succeeded (with a checkpoint at step 2)."""
    return succeed(launch(engagement, suffix="bot"))  # type: ignore[no-any-return]


def test_an_undelivered_model_is_hidden_from_the_customer(alice: Person, made: Job) -> None:
    model_id = made.fine_tuned_model
    models = CustomerModel.objects.for_organization(alice.organization)
    assert {m.engagement_id for m in models} == {made.engagement_id}  # final and checkpoint

    assert not listed(alice) & {m.pk for m in models}
    assert alice.client.get(f"/v1/models/{model_id}").status_code == 404
    assert alice.client.delete(f"/v1/models/{model_id}").status_code == 404
    assert not Deployment.objects.for_organization(alice.organization).exists()  # not auto-deployed
    with pytest.raises(NotFound):
        model_ref(organization=alice.organization, model_id=model_id, kind="chat")
    deploy = alice.client.post(
        "/v1/deployments", {"model": model_id, "type": "serverless"}, format="json"
    )
    assert deploy.status_code == 404


def test_a_delivered_model_is_listed_and_with_deploy_callable(
    alice: Person, engagement: Engagement, made: Job
) -> None:
    model_id = made.fine_tuned_model

    delivered = services.engagement_model_deliver(
        engagement=engagement, model_id=model_id, deploy=True, actor=actor_of(engagement.owner)
    )

    assert delivered.delivered_at is not None
    assert model_id in listed(alice)
    assert alice.client.get(f"/v1/models/{model_id}").status_code == 200
    (deployment,) = Deployment.objects.for_organization(alice.organization)
    assert deployment.model_id == model_id
    ref = model_ref(organization=alice.organization, model_id=model_id, kind="chat")
    assert ref.adapter_uri == delivered.uri
    checkpoint = f"{model_id}:ckpt-step-2"
    assert checkpoint not in listed(alice)  # only what was delivered
    entry = AuditLog.objects.for_organization(alice.organization).get(
        action="engagement.model_delivered"
    )
    assert entry.details["model_id"] == model_id
    assert entry.details["deployment_id"] == deployment.pk
    assert entry.actor_id == engagement.owner_id
    body = alice.client.get(f"/v1/engagements/{engagement.pk}").json()
    assert [m["id"] for m in body["delivered_models"]] == [model_id]
    assert "delivered to your organization and deployed" in body["events"][0]["message"]


def test_delivering_without_deploy_lists_it_undeployed(
    alice: Person, engagement: Engagement, made: Job
) -> None:
    services.engagement_model_deliver(
        engagement=engagement, model_id=made.fine_tuned_model, actor=actor_of(engagement.owner)
    )
    assert made.fine_tuned_model in listed(alice)
    assert not Deployment.objects.for_organization(alice.organization).exists()


def test_a_model_is_delivered_once(alice: Person, engagement: Engagement, made: Job) -> None:
    actor = actor_of(engagement.owner)
    services.engagement_model_deliver(
        engagement=engagement, model_id=made.fine_tuned_model, actor=actor
    )
    with pytest.raises(Conflict) as refused:
        services.engagement_model_deliver(
            engagement=engagement, model_id=made.fine_tuned_model, actor=actor
        )
    assert refused.value.code == "already_delivered"
    assert (
        AuditLog.objects.for_organization(alice.organization)
        .filter(action="engagement.model_delivered")
        .count()
        == 1
    )


def test_delivering_another_organizations_model_is_refused_and_changes_nothing(
    alice: Person,
    charlie: Person,
    staff: Any,
    engagement: Engagement,
    launch: Launch,
    succeed: Any,
    django_capture_on_commit_callbacks: Any,
) -> None:
    from tests.support.jobs import chat_rows, upload_file

    globex = activated(engagement_for(charlie, owner=staff, title="Globex bot"))
    their_file = upload_file(charlie, chat_rows(20), django_capture_on_commit_callbacks)
    theirs = succeed(launch(globex, training_file=their_file)).fine_tuned_model

    with pytest.raises(ApiError) as refused:
        services.engagement_model_deliver(
            engagement=engagement, model_id=theirs, actor=actor_of(staff)
        )

    assert refused.value.code == "wrong_organization"
    assert "another organization" in str(refused.value.detail)
    model = CustomerModel.objects.for_organization(charlie.organization).get(pk=theirs)
    assert model.delivered_at is None
    assert theirs not in listed(alice) | listed(charlie)
    assert (
        not AuditLog.objects.dangerously_unscoped()
        .filter(action="engagement.model_delivered")
        .exists()
    )


def test_only_this_engagements_succeeded_final_models_are_delivered(
    alice: Person, staff: Any, engagement: Engagement, made: Job
) -> None:
    actor = actor_of(staff)
    with pytest.raises(ApiError, match="checkpoint"):
        services.engagement_model_deliver(
            engagement=engagement, model_id=f"{made.fine_tuned_model}:ckpt-step-2", actor=actor
        )
    other = activated(engagement_for(alice, owner=staff, title="Other"))
    with pytest.raises(ApiError, match="not made by this engagement"):
        services.engagement_model_deliver(
            engagement=other, model_id=made.fine_tuned_model, actor=actor
        )
    with pytest.raises(NotFound):
        services.engagement_model_deliver(engagement=engagement, model_id="ft:nope", actor=actor)
    assert (
        CustomerModel.objects.for_organization(alice.organization)
        .filter(delivered_at__isnull=False)
        .count()
        == 0
    )


def test_a_self_serve_model_is_not_the_engagements_to_deliver(
    alice: Person, staff: Any, engagement: Engagement
) -> None:
    from tests.support.registry import customer_model

    own = customer_model(alice, suffix="mine")
    with pytest.raises(ApiError, match="not made by this engagement"):
        services.engagement_model_deliver(
            engagement=engagement, model_id=own.pk, actor=actor_of(staff)
        )


def test_nothing_is_delivered_from_a_closed_engagement(
    alice: Person, engagement: Engagement, made: Job
) -> None:
    Engagement.objects.for_organization(alice.organization).filter(pk=engagement.pk).update(
        status="cancelled"
    )
    with pytest.raises(Conflict):
        services.engagement_model_deliver(
            engagement=engagement, model_id=made.fine_tuned_model, actor=actor_of(engagement.owner)
        )
    assert made.fine_tuned_model not in listed(alice)
