"""Writes for users (sign-up, joining by invitation) and API keys. Keyword-only,
transactional, audited."""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from django.conf import settings
from django.contrib.auth import authenticate
from django.contrib.auth.password_validation import validate_password
from django.core.exceptions import ValidationError as DjangoValidationError
from django.db import IntegrityError, transaction
from django.utils import timezone

from controlplane.audit.services import Actor, audit_record
from controlplane.core.errors import ApiError, Conflict, MissingScope
from controlplane.tenancy import services as tenancy_services
from controlplane.tenancy.models import Membership, Organization
from controlplane.tenancy.roles import Role, can_manage_role

from . import keys
from .models import APIKey, User
from .scopes import GRANTABLE, expand

if TYPE_CHECKING:
    from .authentication import Principal


@dataclass(frozen=True)
class IssuedKey:
    """A key row and its plaintext, which exists only in this response."""

    api_key: APIKey
    value: str


@dataclass(frozen=True)
class SignupResult:
    user: User
    organization: Organization
    membership: Membership
    issued: IssuedKey


def password_check(*, password: str, email: str) -> None:
    """Raise a 400 naming every reason the password is too weak."""
    try:
        validate_password(password, user=User(email=email))
    except DjangoValidationError as exc:
        raise ApiError(
            "Password is too weak: " + " ".join(exc.messages),
            param="password",
            code="weak_password",
        ) from None


def scopes_validate(*, scopes: list[str], granter: frozenset[str] | None) -> list[str]:
    """Known scope names only, and never more than the granting key holds."""
    unknown = sorted(set(scopes) - GRANTABLE)
    if unknown:
        raise ApiError(
            f"Unknown scope(s): {', '.join(unknown)}. "
            f"Valid scopes: {', '.join(sorted(GRANTABLE))}.",
            param="scopes",
            code="invalid_scope",
        )
    if not scopes:
        raise ApiError("A key needs at least one scope.", param="scopes", code="invalid_scope")
    if granter is not None:
        beyond = sorted(expand(scopes) - granter)
        if beyond:
            raise ApiError(
                "A key cannot grant scopes its creator lacks: " + ", ".join(beyond) + ".",
                param="scopes",
                code="scope_escalation",
            )
    return sorted(set(scopes))


def api_key_member_check(
    *, principal: Principal | None, member: Membership | None, action: str, param: str | None = None
) -> None:
    """Refuse (403) to create, rotate, rename or revoke a key for `member` unless the
    caller may manage that member's role.

    A key acts with its member's role, so whoever holds a key bound to a member is
    that member: issuing one for an owner to an admin would let the admin act as
    owner (promote themselves, demote the owner). The rule is the one for roles
    (`can_manage_role`: only owners manage owners); anyone may manage keys bound to
    themselves. A service key (no member) acts like an admin, so its keys are
    managed by whoever may manage admins. `principal` None is staff or the system
    (the Django admin, shells), which act outside any role. Call it inside the
    write's transaction with `member` as just read, so a concurrent role change
    cannot slip between the check and the write.
    """
    if principal is None:
        return
    own = principal.membership
    if member is not None and own is not None and member.pk == own.pk:
        return
    target = member.role if member is not None else Role.ADMIN
    if can_manage_role(principal.role, target):
        return
    who = "A service key" if own is None else f"A member with the '{principal.role}' role"
    whose = (
        f"a member with the '{target}' role"
        if member is not None
        else "a service account (which acts like an admin)"
    )
    if action == "create":
        what = f"create keys for {whose}"
        fix = "Ask an owner" if own is None else "Omit 'member_id' to bind the key to yourself"
    else:
        what = f"{action} a key that belongs to {whose}"
        fix = "Ask an owner, or the key's own member"
    raise MissingScope(
        f"{who} cannot {what}: a key acts with its member's role; only owners "
        f"manage owners, and only owners and admins manage other members. {fix}.",
        param=param,
        code="insufficient_role",
    )


def _locked_member(api_key: APIKey) -> Membership | None:
    if api_key.member_id is None:
        return None
    return (
        Membership.objects.for_organization(api_key.organization_id)
        .select_for_update()
        .get(pk=api_key.member_id)
    )


def api_key_manage_check(
    *, principal: Principal | None, api_key: APIKey, action: str
) -> Membership | None:
    """Lock `api_key`'s member and refuse (403) unless the caller may manage it (see
    api_key_member_check): for writes to a key made outside this module, such as its
    rate limits. Call it inside the write's transaction. Returns the locked member."""
    member = _locked_member(api_key)
    api_key_member_check(principal=principal, member=member, action=action)
    return member


def _issue(
    *,
    organization: Organization,
    name: str,
    scopes: list[str],
    member: Membership | None,
    created_by: User | None,
    expires_at: datetime | None = None,
) -> IssuedKey:
    new = keys.generate()
    api_key = APIKey.objects.create(
        organization=organization,
        name=name,
        prefix=new.prefix,
        hashed_key=new.hashed,
        last_four=new.last_four,
        scopes=scopes,
        member=member,
        created_by=created_by,
        expires_at=expires_at,
    )
    return IssuedKey(api_key=api_key, value=new.key)


@transaction.atomic
def user_signup(
    *, email: str, password: str, organization_name: str, kinds: list[str], actor: Actor
) -> SignupResult:
    """Create a user, an organization they own, and their first (all-scopes) key."""
    email = User.objects.normalize_email(email).lower()
    if User.objects.filter(email__iexact=email).exists():
        raise Conflict(
            "An account with this email already exists. Log in, or ask an owner to invite you.",
            param="email",
            code="email_taken",
        )
    password_check(password=password, email=email)
    try:
        with transaction.atomic():
            user = User.objects.create_user(email=email, password=password)
    except IntegrityError:  # lost a race with a concurrent sign-up
        raise Conflict(
            "An account with this email already exists.", param="email", code="email_taken"
        ) from None
    organization = Organization.objects.create(
        name=organization_name,
        is_customer="customer" in kinds,
        is_data_partner="data_partner" in kinds,
    )
    membership = Membership.objects.create(organization=organization, user=user, role=Role.OWNER)
    issued = _issue(
        organization=organization,
        name="Default key",
        scopes=["all"],
        member=membership,
        created_by=user,
    )
    actor = replace(actor, type="user", id=user.pk, email=user.email)
    audit_record(
        organization=organization,
        actor=actor,
        action="organization.created",
        target=organization,
        details={"name": organization.name, "kinds": kinds},
    )
    audit_record(
        organization=organization,
        actor=actor,
        action="api_key.created",
        target=issued.api_key,
        details={"name": issued.api_key.name, "scopes": ["all"]},
    )
    return SignupResult(user=user, organization=organization, membership=membership, issued=issued)


@transaction.atomic
def api_key_create(
    *,
    principal: Principal,
    name: str,
    scopes: list[str],
    member: Membership | None,
    expires_at: datetime | None,
    actor: Actor,
) -> IssuedKey:
    scopes = scopes_validate(scopes=scopes, granter=principal.scopes)
    if expires_at is not None and expires_at <= timezone.now():
        raise ApiError("'expires_at' must be in the future.", param="expires_at")
    if member is not None:
        member = Membership.objects.locked(member)  # the role as of this transaction
    api_key_member_check(principal=principal, member=member, action="create", param="member_id")
    issued = _issue(
        organization=principal.organization,
        name=name,
        scopes=scopes,
        member=member,
        created_by=principal.user,
        expires_at=expires_at,
    )
    audit_record(
        organization=principal.organization,
        actor=actor,
        action="api_key.created",
        target=issued.api_key,
        details={
            "name": name,
            "scopes": scopes,
            "member_id": member.pk if member else None,
            "expires_at": expires_at.isoformat() if expires_at else None,
        },
    )
    return issued


@transaction.atomic
def api_key_rename(
    *, api_key: APIKey, name: str, principal: Principal | None, actor: Actor
) -> APIKey:
    api_key = APIKey.objects.locked(api_key)
    api_key_member_check(principal=principal, member=_locked_member(api_key), action="rename")
    old = api_key.name
    api_key.name = name
    api_key.save(update_fields=["name"])
    audit_record(
        organization=api_key.organization_id,
        actor=actor,
        action="api_key.updated",
        target=api_key,
        details={"name": {"from": old, "to": name}},
    )
    return api_key


@transaction.atomic
def api_key_revoke(*, api_key: APIKey, principal: Principal | None, actor: Actor) -> APIKey:
    """Revoke at once. Idempotent: revoking a revoked key changes nothing.

    `principal` None: staff or the system, outside any role (see api_key_member_check).
    """
    locked = APIKey.objects.locked(api_key)
    api_key_member_check(principal=principal, member=_locked_member(locked), action="revoke")
    if locked.revoked_at is None:
        locked.revoked_at = timezone.now()
        locked.save(update_fields=["revoked_at"])
        audit_record(
            organization=locked.organization_id,
            actor=actor,
            action="api_key.revoked",
            target=locked,
            details={"name": locked.name},
        )
    return locked


@transaction.atomic
def api_key_rotate(
    *, api_key: APIKey, grace_period_seconds: int | None, principal: Principal, actor: Actor
) -> IssuedKey:
    """Issue a replacement with the same name, scopes, member and expiry.

    The old key keeps working for the grace period (default
    API_KEY_ROTATION_GRACE_SECONDS, 24 h; 0 ends it now), so deployments can
    switch over without downtime. The new key stays bound to the old key's member
    (never the caller), and only someone who may manage that member rotates it:
    the caller receives the new value, so rotating is as strong as creating.
    """
    grace = (
        settings.API_KEY_ROTATION_GRACE_SECONDS
        if grace_period_seconds is None
        else grace_period_seconds
    )
    locked = APIKey.objects.locked(api_key)
    member = _locked_member(locked)
    api_key_member_check(principal=principal, member=member, action="rotate")
    if locked.revoked_at is not None:
        raise Conflict("A revoked key cannot be rotated; create a new key.", code="key_revoked")
    if locked.rotated_at is not None:
        raise Conflict(
            f"This key was already rotated (to {locked.rotated_to_id}); rotate that key instead.",
            code="key_already_rotated",
        )
    scopes_validate(scopes=locked.scopes, granter=principal.scopes)
    now = timezone.now()
    issued = _issue(
        organization=locked.organization,
        name=locked.name,
        scopes=locked.scopes,
        member=member,
        created_by=principal.user,
        expires_at=locked.expires_at,
    )
    grace_end = now + timedelta(seconds=grace)
    locked.rotated_at = now
    locked.rotated_to = issued.api_key
    if locked.expires_at is None or locked.expires_at > grace_end:
        locked.expires_at = grace_end
    locked.save(update_fields=["rotated_at", "rotated_to", "expires_at"])
    audit_record(
        organization=locked.organization_id,
        actor=actor,
        action="api_key.created",
        target=issued.api_key,
        details={"name": locked.name, "scopes": locked.scopes, "rotated_from": locked.pk},
    )
    audit_record(
        organization=locked.organization_id,
        actor=actor,
        action="api_key.rotated",
        target=locked,
        details={
            "new_key_id": issued.api_key.pk,
            "grace_period_seconds": grace,
            "old_key_expires_at": locked.expires_at.isoformat(),
        },
    )
    return issued


@transaction.atomic
def member_first_key(*, membership: Membership, actor: Actor) -> IssuedKey:
    """The key a new member gets on joining: all scopes, bounded by their role."""
    issued = _issue(
        organization=membership.organization,
        name="Default key",
        scopes=["all"],
        member=membership,
        created_by=membership.user,
    )
    audit_record(
        organization=membership.organization,
        actor=actor,
        action="api_key.created",
        target=issued.api_key,
        details={"name": issued.api_key.name, "scopes": ["all"], "member_id": membership.pk},
    )
    return issued


@transaction.atomic
def invitation_accept(*, token: str, password: str, actor: Actor) -> tuple[Membership, IssuedKey]:
    """Join the organization an emailed invitation names: an existing account proves its
    password, a new one is created.

    Returns the membership and the member's first API key (all scopes, bounded by role).
    """
    invitation = tenancy_services.invitation_pending_locked(token=token)
    user = User.objects.filter(email__iexact=invitation.email).first()
    if user is None:
        password_check(password=password, email=invitation.email)
        user = User.objects.create_user(email=invitation.email, password=password)
    elif authenticate(username=user.email, password=password) is None:
        raise ApiError(
            "An account with this email exists: give its password to accept.",
            status_code=401,
            param="password",
            code="invalid_password",
        )
    actor = replace(actor, type="user", id=user.pk, email=user.email)
    membership = tenancy_services.invitation_join(
        invitation=invitation, user_id=user.pk, email=user.email, actor=actor
    )
    return membership, member_first_key(membership=membership, actor=actor)
