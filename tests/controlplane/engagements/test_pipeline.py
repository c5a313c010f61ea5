"""An engagement moves only along its pipeline; every other move is refused and changes nothing."""

from __future__ import annotations

import pytest

from controlplane.audit.models import AuditLog
from controlplane.core.errors import ApiError, Conflict
from controlplane.engagements import services
from controlplane.engagements.models import (
    TERMINAL,
    TRANSITIONS,
    Engagement,
    EngagementEvent,
    EngagementStatus,
)
from tests.support.engagements import actor_of, engagement_for, staff_member
from tests.support.people import Person

pytestmark = pytest.mark.django_db

S = EngagementStatus
ALLOWED = [(f, t) for f, moves in TRANSITIONS.items() for t in moves]
REFUSED = [(f, t) for f in S.values for t in S.values if t not in TRANSITIONS[f]]


def test_the_pipeline_is_the_one_the_issue_names() -> None:
    assert (S.LEAD, S.SCOPING) in ALLOWED
    assert (S.SCOPING, S.PROPOSAL) in ALLOWED
    assert (S.PROPOSAL, S.ACTIVE) in ALLOWED
    assert (S.ACTIVE, S.DELIVERED) in ALLOWED
    assert (S.DELIVERED, S.CLOSED) in ALLOWED
    assert set(TERMINAL) == {S.CLOSED, S.CANCELLED}
    for status in set(S.values) - TERMINAL:
        assert S.CANCELLED in TRANSITIONS[status], status
    assert (S.LEAD, S.ACTIVE) not in ALLOWED  # no skipping the proposal


def _at(alice: Person, status: str) -> Engagement:
    engagement = engagement_for(alice)
    Engagement.objects.for_organization(alice.organization).filter(pk=engagement.pk).update(
        status=status
    )
    return Engagement.objects.for_organization(alice.organization).get(pk=engagement.pk)


@pytest.mark.parametrize(("start", "to"), ALLOWED, ids=[f"{f}->{t}" for f, t in ALLOWED])
def test_an_allowed_move_is_made_audited_and_told_to_the_customer(
    alice: Person, start: str, to: str
) -> None:
    engagement = _at(alice, start)
    staff = engagement.owner

    moved = services.engagement_transition(
        engagement=engagement, to_status=to, actor=actor_of(staff)
    )

    assert moved.status == to
    assert moved.status_changed_at is not None
    entry = AuditLog.objects.for_organization(alice.organization).get(
        action="engagement.transitioned"
    )
    assert entry.details == {"engagement_id": engagement.pk, "from": start, "to": to}
    assert (entry.actor_type, entry.actor_id, entry.actor_email) == (
        "staff",
        staff.pk,
        staff.email,
    )
    assert entry.target_type == "engagement"
    assert entry.target_id == engagement.pk
    assert (
        EngagementEvent.objects.for_organization(alice.organization)
        .filter(
            engagement=engagement, kind="status", message=f"Status changed from {start} to {to}."
        )
        .exists()
    )


@pytest.mark.parametrize(("start", "to"), REFUSED, ids=[f"{f}->{t}" for f, t in REFUSED])
def test_every_other_move_is_refused_and_changes_nothing(
    alice: Person, start: str, to: str
) -> None:
    engagement = _at(alice, start)
    events = EngagementEvent.objects.for_organization(alice.organization).count()
    audits = AuditLog.objects.for_organization(alice.organization).count()

    with pytest.raises(Conflict) as refused:
        services.engagement_transition(
            engagement=engagement, to_status=to, actor=actor_of(engagement.owner)
        )

    assert refused.value.code == "invalid_transition"
    assert f"from '{start}' to '{to}'" in str(refused.value.detail)
    stored = Engagement.objects.for_organization(alice.organization).get(pk=engagement.pk)
    assert (stored.status, stored.status_changed_at) == (start, None)
    assert EngagementEvent.objects.for_organization(alice.organization).count() == events
    assert AuditLog.objects.for_organization(alice.organization).count() == audits


def test_an_unknown_status_is_refused(alice: Person) -> None:
    engagement = engagement_for(alice)
    with pytest.raises(ApiError) as refused:
        services.engagement_transition(
            engagement=engagement, to_status="won", actor=actor_of(engagement.owner)
        )
    assert refused.value.code == "invalid_status"
    assert Engagement.objects.for_organization(alice.organization).get().status == S.LEAD


def test_an_engagement_is_owned_by_staff_only(alice: Person, bob: Person) -> None:
    with pytest.raises(ApiError, match="staff member"):
        engagement_for(alice, owner=bob.user)
    assert not Engagement.objects.for_organization(alice.organization).exists()


def test_the_engagement_and_its_creation_are_recorded(alice: Person) -> None:
    staff = staff_member()
    engagement = engagement_for(alice, owner=staff)

    assert engagement.pk.startswith("eng_")
    created = AuditLog.objects.for_organization(alice.organization).get(action="engagement.created")
    assert created.actor_email == staff.email
    # Customers read their audit log: staff's engagement work is not in it.
    logs = alice.client.get("/v1/organization/audit_logs").json()["data"]
    assert not [e for e in logs if e["type"].startswith("engagement.")]
    assert staff.email not in str(logs)
