"""Writes for organizations, members and invitations. Every change is audited."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import timedelta

from django.conf import settings
from django.core.mail import send_mail
from django.db import IntegrityError, transaction
from django.utils import timezone

from controlplane.audit.services import Actor, audit_record
from controlplane.core.errors import Conflict, MissingScope, NotFound

from .models import Invitation, InvitationStatus, Membership, Organization
from .roles import Role, can_manage_role


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _require_can_manage(actor_role: str | None, target_role: str) -> None:
    if not can_manage_role(actor_role, target_role):
        who = actor_role or "service key"
        raise MissingScope(
            f"A {who} cannot grant, change or remove the '{target_role}' role; "
            "only owners manage owners, and only owners and admins manage members.",
            code="insufficient_role",
        )


@transaction.atomic
def organization_update(
    *, organization: Organization, name: str | None, kinds: list[str] | None, actor: Actor
) -> Organization:
    changes: dict[str, object] = {}
    if name is not None and name != organization.name:
        changes["name"] = {"from": organization.name, "to": name}
        organization.name = name
    if kinds is not None and sorted(kinds) != sorted(organization.kinds):
        changes["kinds"] = {"from": organization.kinds, "to": sorted(kinds)}
        organization.is_customer = "customer" in kinds
        organization.is_data_partner = "data_partner" in kinds
    if changes:
        organization.save()
        audit_record(
            organization=organization,
            actor=actor,
            action="organization.updated",
            target=organization,
            details=changes,
        )
    return organization


@dataclass(frozen=True)
class NewInvitation:
    invitation: Invitation
    token: str


@transaction.atomic
def invitation_create(
    *,
    organization: Organization,
    email: str,
    role: str,
    actor_role: str | None,
    invited_by_id: str | None,
    actor: Actor,
) -> NewInvitation:
    """Invite someone by email; the token goes only to that address."""
    _require_can_manage(actor_role, role)
    email = email.strip().lower()
    if organization.memberships.filter(user__email__iexact=email).exists():
        raise Conflict(
            f"{email} is already a member of this organization.",
            param="email",
            code="already_member",
        )
    token = "inv_" + secrets.token_urlsafe(32)
    try:
        with transaction.atomic():
            invitation = Invitation.objects.create(
                organization=organization,
                email=email,
                role=role,
                token_hash=_token_hash(token),
                invited_by_id=invited_by_id,
                expires_at=timezone.now() + timedelta(seconds=settings.INVITATION_TTL_SECONDS),
            )
    except IntegrityError:
        raise Conflict(
            f"{email} already has a pending invitation; revoke it to send a new one.",
            param="email",
            code="invitation_pending",
        ) from None
    audit_record(
        organization=organization,
        actor=actor,
        action="invite.created",
        target=invitation,
        details={"email": email, "role": role},
    )
    transaction.on_commit(
        lambda: send_mail(
            subject=f"You are invited to {organization.name} on Atelier",
            message=(
                f"You have been invited to join {organization.name} as {role}.\n"
                f"Accept with POST /v1/invitations/accept and this token:\n\n{token}\n\n"
                f"It expires at {invitation.expires_at.isoformat()}."
            ),
            from_email=None,
            recipient_list=[email],
        )
    )
    return NewInvitation(invitation=invitation, token=token)


@transaction.atomic
def invitation_revoke(*, invitation: Invitation, actor: Actor) -> Invitation:
    if invitation.status != InvitationStatus.PENDING:
        raise Conflict(f"This invitation is already {invitation.status}.", code="invitation_closed")
    invitation.status = InvitationStatus.REVOKED
    invitation.save(update_fields=["status"])
    audit_record(
        organization=invitation.organization_id,
        actor=actor,
        action="invite.revoked",
        target=invitation,
        details={"email": invitation.email},
    )
    return invitation


def invitation_pending_locked(*, token: str) -> Invitation:
    """The pending, unexpired invitation this emailed token opens, locked (SELECT … FOR
    UPDATE) for accepting it: call inside the accepting transaction. Every miss is the
    same 404, whether the token is unknown, expired or already used."""
    invalid = NotFound(
        "This invitation token is invalid, expired or already used.",
        param="token",
        code="invalid_invitation",
    )
    try:
        invitation = (
            Invitation.objects.dangerously_unscoped()  # the token is how we find the tenant
            .select_for_update()
            .select_related("organization")
            .get(token_hash=_token_hash(token), status=InvitationStatus.PENDING)
        )
    except Invitation.DoesNotExist:
        raise invalid from None
    if invitation.expires_at <= timezone.now():
        raise invalid
    return invitation


@transaction.atomic
def invitation_join(
    *, invitation: Invitation, user_id: str, email: str, actor: Actor
) -> Membership:
    """The account (`user_id`, `email`) joins the organization with the invited role and
    the invitation closes (audited). Call in the transaction that locked it
    (`invitation_pending_locked`): accounts' `invitation_accept` finds or makes the
    account and issues its first key."""
    organization = invitation.organization
    if organization.memberships.filter(user_id=user_id).exists():
        raise Conflict("You are already a member of this organization.", code="already_member")
    membership = Membership.objects.create(
        organization=organization, user_id=user_id, role=invitation.role
    )
    invitation.status = InvitationStatus.ACCEPTED
    invitation.accepted_at = timezone.now()
    invitation.save(update_fields=["status", "accepted_at"])
    audit_record(
        organization=organization,
        actor=actor,
        action="member.added",
        target=membership,
        details={"email": email, "role": membership.role, "invitation_id": invitation.pk},
    )
    return membership


def _lock_owners(organization_id: str) -> list[Membership]:
    # Lock every owner row so two concurrent demotions cannot both pass the check.
    return list(
        Membership.objects.for_organization(organization_id)
        .select_for_update()
        .filter(role=Role.OWNER)
        .order_by("pk")
    )


def _refuse_last_owner(member: Membership, owners: list[Membership], verb: str) -> None:
    if member.role == Role.OWNER and len(owners) <= 1:
        raise Conflict(
            f"Cannot {verb} the last owner of the organization: make another member owner first.",
            code="last_owner",
        )


@transaction.atomic
def membership_change_role(
    *, member: Membership, role: str, actor_role: str | None, actor: Actor
) -> Membership:
    _require_can_manage(actor_role, member.role)
    _require_can_manage(actor_role, role)
    owners = _lock_owners(member.organization_id)
    member = Membership.objects.locked(member)
    if role == member.role:
        return member
    if role != Role.OWNER:
        _refuse_last_owner(member, owners, "demote")
    old = member.role
    member.role = role
    member.save(update_fields=["role", "updated_at"])
    audit_record(
        organization=member.organization_id,
        actor=actor,
        action="member.role_changed",
        target=member,
        details={"user_id": member.user_id, "from": old, "to": role},
    )
    return member


@transaction.atomic
def membership_remove(*, member: Membership, actor_role: str | None, actor: Actor) -> None:
    """Remove a member; their member-bound API keys are deleted with the membership."""
    _require_can_manage(actor_role, member.role)
    owners = _lock_owners(member.organization_id)
    _refuse_last_owner(member, owners, "remove")
    key_ids = list(member.api_keys.values_list("pk", flat=True))
    audit_record(
        organization=member.organization_id,
        actor=actor,
        action="member.removed",
        target=member,
        details={"user_id": member.user_id, "role": member.role, "deleted_api_key_ids": key_ids},
    )
    member.delete()
