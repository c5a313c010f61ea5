"""Who a console session acts as, and the login and sign-up throttles.

A browser session is a user logged in with Django's session auth, not an API key. The
services of accounts and tenancy take a `Principal` (a key, its organization, member
and effective scopes); the console hands them one whose scopes are the member's role
ceiling (`effective(["all"], role)`): a session can do exactly what an all-scopes key
of that member could, so roles are enforced by the same code as in the API. Its key
is never saved (no row, no value): services read only the organization, member,
scopes and user from it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace

from django.core.cache import cache
from django.http import HttpRequest
from rest_framework.request import Request
from rest_framework.throttling import SimpleRateThrottle
from rest_framework.views import APIView

from controlplane.accounts.authentication import Principal
from controlplane.accounts.models import APIKey, User
from controlplane.accounts.scopes import effective
from controlplane.audit.models import ActorType
from controlplane.audit.services import Actor
from controlplane.core.net import client_ip
from controlplane.tenancy.models import Membership

#: Which organization the session is in (a user may belong to several).
SESSION_ORGANIZATION = "console_organization_id"

#: Failed log-ins allowed per email and client IP within the window, then refused.
LOGIN_FAILURES = 5
LOGIN_WINDOW_SECONDS = 15 * 60


@dataclass(frozen=True)
class Console:
    """The session's member, organization and the principal the services take."""

    membership: Membership
    principal: Principal

    def can(self, scope: str) -> bool:
        return scope in self.principal.scopes


def memberships_of(user: User) -> list[Membership]:
    # Crossing tenants is the point here: which organizations is this user a member of.
    return list(
        Membership.objects.dangerously_unscoped()
        .select_related("organization", "user")
        .filter(user=user)
        .order_by("created_at", "id")
    )


def console_for(request: HttpRequest) -> Console | None:
    """The session's membership (the chosen organization, else the first), or None."""
    user = request.user
    if not isinstance(user, User):
        return None
    memberships = memberships_of(user)
    if not memberships:
        return None
    chosen = request.session.get(SESSION_ORGANIZATION)
    membership = next((m for m in memberships if m.organization_id == chosen), memberships[0])
    session_key = APIKey(
        organization=membership.organization, name="console session", scopes=["all"]
    )
    principal = Principal(
        api_key=session_key,
        organization=membership.organization,
        membership=membership,
        scopes=effective(["all"], membership.role),
    )
    return Console(membership=membership, principal=principal)


def actor_for(request: HttpRequest, user: User) -> Actor:
    """The audit actor: the user, from this browser (IP, user agent, request id)."""
    return replace(Actor.from_request(request), type=ActorType.USER, id=user.pk, email=user.email)


def _login_key(email: str, request: HttpRequest) -> str:
    ident = f"{email.strip().lower()}|{client_ip(request) or ''}"
    return "console:login-failures:" + hashlib.sha256(ident.encode()).hexdigest()


def login_blocked(email: str, request: HttpRequest) -> bool:
    return int(cache.get(_login_key(email, request), 0)) >= LOGIN_FAILURES


def login_failed(email: str, request: HttpRequest) -> None:
    """Count a failure; the window starts at the first failure (a fixed window)."""
    key = _login_key(email, request)
    if not cache.add(key, 1, timeout=LOGIN_WINDOW_SECONDS):
        try:
            cache.incr(key)
        except ValueError:  # expired between add and incr
            cache.add(key, 1, timeout=LOGIN_WINDOW_SECONDS)


def login_succeeded(email: str, request: HttpRequest) -> None:
    cache.delete(_login_key(email, request))


class SignupThrottle(SimpleRateThrottle):
    """The API's sign-up throttle (`signup` rate, per client IP), on the same counters:
    signing up from the console or `POST /v1/signup` spends the same allowance."""

    scope = "signup"

    def get_cache_key(self, request: Request, view: APIView) -> str:
        return self.cache_format % {"scope": self.scope, "ident": self.get_ident(request)}


def signup_allowed(request: HttpRequest) -> bool:
    return SignupThrottle().allow_request(Request(request), APIView())
