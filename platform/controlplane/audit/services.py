"""Writing the audit log. Call inside the transaction of the change it records."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Protocol, runtime_checkable

from django.db import models
from django.http import HttpRequest

from controlplane.core.net import client_ip

from .models import ActorType, AuditLog


@runtime_checkable
class KeyCaller(Protocol):
    """What API-key authentication puts on `request.user` (accounts' `Principal`; audit
    sits below accounts, which records through it, and never imports it)."""

    @property
    def api_key(self) -> models.Model: ...
    @property
    def user(self) -> Any: ...


@dataclass(frozen=True)
class Actor:
    type: str
    id: str = ""
    email: str = ""
    api_key_id: str = ""
    ip_address: str | None = None
    user_agent: str = ""
    request_id: str = ""

    @classmethod
    def from_request(cls, request: HttpRequest) -> Actor:
        """Whoever made `request`: a key's member, a service key, or a staff user (admin)."""
        seen = cls(
            type=ActorType.SYSTEM,
            ip_address=client_ip(request),
            user_agent=request.headers.get("user-agent", "")[:400],
            request_id=str(getattr(request, "request_id", "")),
        )
        principal = getattr(request, "user", None)
        if isinstance(principal, KeyCaller):
            key_id = principal.api_key.pk
            user = principal.user
            if user is not None:
                return replace(
                    seen, type=ActorType.USER, id=user.pk, email=user.email, api_key_id=key_id
                )
            return replace(seen, type=ActorType.API_KEY, id=key_id, api_key_id=key_id)
        if principal is not None and getattr(principal, "is_staff", False):
            return replace(seen, type=ActorType.STAFF, id=principal.pk, email=principal.email)
        return seen


_TARGET_TYPES = {
    "Organization": "organization",
    "Membership": "member",
    "Invitation": "invite",
    "APIKey": "api_key",
    "User": "user",
}


def audit_record(
    *,
    organization: models.Model | str,
    actor: Actor,
    action: str,
    target: models.Model | None = None,
    target_type: str = "",
    details: dict[str, Any] | None = None,
) -> AuditLog:
    org_id = organization if isinstance(organization, str) else organization.pk
    return AuditLog.objects.create(
        organization_id=org_id,
        action=action,
        actor_type=actor.type,
        actor_id=actor.id,
        actor_email=actor.email,
        api_key_id=actor.api_key_id,
        target_type=target_type or _TARGET_TYPES.get(type(target).__name__, "")
        if target is not None
        else target_type,
        target_id=str(target.pk) if target is not None else "",
        details=details or {},
        ip_address=actor.ip_address,
        user_agent=actor.user_agent,
        request_id=actor.request_id,
    )
