"""Engagement test data: staff members (with or without the engagement permissions) and
engagements made the way the admin makes them."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from django.contrib.auth.models import Permission

from controlplane.accounts.models import User
from controlplane.audit.services import Actor

from .people import PASSWORD, Person

#: Every permission on engagements: view and change, and the four actions.
ALL_PERMISSIONS = (
    "view_engagement",
    "change_engagement",
    "add_engagement",
    "add_milestone",
    "change_milestone",
    "delete_milestone",
    "view_milestone",
    "add_engagementevent",
    "view_engagementevent",
    "launch_job",
    "deliver_model",
    "bill_milestone",
    "move_engagement",
)


def staff_member(
    email: str = "ops@atelier.test", *, permissions: tuple[str, ...] = ALL_PERMISSIONS
) -> User:
    """A staff user (not a superuser) holding `permissions` of the engagements app."""
    user = User.objects.create_user(email=email, password=PASSWORD, is_staff=True, name="Olga Ops")
    user.user_permissions.set(
        Permission.objects.filter(content_type__app_label="engagements", codename__in=permissions)
    )
    return User.objects.get(pk=user.pk)  # a fresh object: no cached permissions


def actor_of(user: User) -> Actor:
    return Actor(type="staff", id=user.pk, email=user.email)


def engagement_for(person: Person, owner: User | None = None, **fields: Any) -> Any:
    from controlplane.engagements import services

    owner = owner or User.objects.filter(is_staff=True).first() or staff_member()
    values: dict[str, Any] = {
        "title": "Support bot",
        "scope": "A bot that answers order questions",
        "budget_tokens": 1_000_000,
        "budget_gpu_seconds": 100_000,
        "budget_amount": Decimal("500.00"),
        **fields,
    }
    return services.engagement_create(
        organization=person.organization, owner=owner, actor=actor_of(owner), **values
    )


def make_engagement(person: Person) -> str:
    """For the cross-tenant registry: an engagement with a milestone and an event."""
    from controlplane.engagements import services

    engagement = engagement_for(person, owner=staff_member(f"owner-{person.user.pk}@atelier.test"))
    services.milestone_add(
        engagement=engagement,
        title="Prototype",
        amount=Decimal("100.00"),
        actor=Actor(type="system"),
    )
    return str(engagement.pk)
