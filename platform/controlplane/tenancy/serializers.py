"""Output shapes for organizations, members and invitations."""

from __future__ import annotations

from typing import Any

from controlplane.core.serializers import unix

from .models import Invitation, Membership, Organization


def organization_out(organization: Organization) -> dict[str, Any]:
    return {
        "object": "organization",
        "id": organization.pk,
        "name": organization.name,
        "kinds": organization.kinds,
        "created_at": unix(organization.created_at),
    }


def member_out(member: Membership) -> dict[str, Any]:
    return {
        "object": "organization.member",
        "id": member.pk,
        "user_id": member.user_id,
        "email": member.user.email,
        "name": member.user.name,
        "role": member.role,
        "created_at": unix(member.created_at),
    }


def invitation_out(invitation: Invitation) -> dict[str, Any]:
    return {
        "object": "organization.invite",
        "id": invitation.pk,
        "email": invitation.email,
        "role": invitation.role,
        "status": invitation.status,
        "invited_by": invitation.invited_by_id,
        "created_at": unix(invitation.created_at),
        "expires_at": unix(invitation.expires_at),
        "accepted_at": unix(invitation.accepted_at),
    }
