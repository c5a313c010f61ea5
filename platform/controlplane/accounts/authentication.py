"""API key authentication for every tenant endpoint.

Keys travel only in `Authorization: Bearer …` (what the OpenAI SDKs send). One
indexed query by public prefix finds the key with its organization and member;
the hash compare is constant-time; `last_used_at` is written at most once per
`API_KEY_LAST_USED_RESOLUTION_SECONDS` per key, never on every request.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

import structlog
from asgiref.sync import sync_to_async
from django.conf import settings
from django.db.models import Q
from django.utils import timezone
from rest_framework import exceptions
from rest_framework.authentication import BaseAuthentication, get_authorization_header
from rest_framework.request import Request

from . import keys
from .keycache import key_cache
from .models import APIKey
from .scopes import effective

if TYPE_CHECKING:
    from controlplane.tenancy.models import Membership, Organization

    from .models import User

#: Query parameters that would carry a key in a URL (and so into logs and caches).
_KEY_PARAMS = frozenset({"api_key", "apikey", "key", "access_token", "token", "auth"})


@dataclass(frozen=True)
class Principal:
    """Who is calling: a key, its organization, and the member it acts for (if any)."""

    api_key: APIKey
    organization: Organization
    membership: Membership | None
    scopes: frozenset[str]
    is_authenticated: bool = True
    is_anonymous: bool = False

    @property
    def user(self) -> User | None:
        return self.membership.user if self.membership is not None else None

    @property
    def role(self) -> str | None:
        return self.membership.role if self.membership is not None else None

    @property
    def pk(self) -> str:
        # Throttles and loggers identify the caller by `user.pk`.
        return self.api_key.pk


def _failed(message: str, code: str = "invalid_api_key") -> exceptions.AuthenticationFailed:
    return exceptions.AuthenticationFailed(detail=message, code=code)


class ApiKeyAuthentication(BaseAuthentication):
    """DRF's side of `key_authenticate` (every tenant endpoint)."""

    def authenticate(self, request: Request) -> tuple[Principal, APIKey] | None:
        header = get_authorization_header(request)
        principal = key_authenticate(
            header.decode("latin-1") if header else None, request.query_params.items()
        )
        if principal is None:
            return None
        structlog.contextvars.bind_contextvars(
            organization_id=principal.organization.pk, api_key_id=principal.api_key.pk
        )
        return principal, principal.api_key

    def authenticate_header(self, request: Request) -> str:
        return AUTHENTICATE_HEADER


#: What a 401 names in WWW-Authenticate.
AUTHENTICATE_HEADER = 'Bearer realm="atelier"'


def key_authenticate(
    authorization: str | None, query: Iterable[tuple[str, object]] = ()
) -> Principal | None:
    """The caller of a request, from its Authorization header (`Bearer <key>`); None when
    there is none. Raises AuthenticationFailed for a key in the URL (`query`: the query
    parameters), a header that is not a bearer token, and a key that does not verify.
    Blocking: a cache miss, or a use to record, queries the database."""
    token = _token(authorization, query)
    return None if token is None else principal_for(_verify(token))


async def akey_authenticate(
    authorization: str | None, query: Iterable[tuple[str, object]] = ()
) -> Principal | None:
    """`key_authenticate` for the event loop: from this process's cache when that needs
    no database (`cached_key`), else `key_authenticate`'s lookup in a thread."""
    token = _token(authorization, query)
    if token is None:
        return None
    api_key = cached_key(token)
    if api_key is None:
        api_key = await sync_to_async(_verify)(token)
    return principal_for(api_key)


def _token(authorization: str | None, query: Iterable[tuple[str, object]]) -> str | None:
    _refuse_keys_in_url(query)
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise _failed("Send your API key as 'Authorization: Bearer atl_live_…'.")
    return token


def _refuse_keys_in_url(query: Iterable[tuple[str, object]]) -> None:
    for name, value in query:
        if name.lower() in _KEY_PARAMS or str(value).startswith(keys.KEY_START):
            raise _failed(
                "API keys are not accepted in the URL, where they leak into logs and "
                "browser history. Send 'Authorization: Bearer <key>', and rotate a key "
                "that was ever put in a URL.",
                code="api_key_in_url",
            )


def _verify(token: str) -> APIKey:
    prefix = _prefix(token)
    hit = key_cache.get(prefix)
    cached = hit is not None
    if hit is not None:
        # Storing the refreshed copy back keeps the hit's read time: the TTL is not
        # renewed by use, so a missed invalidation is bounded by it (keycache.py).
        api_key: APIKey | None = hit.api_key
        cache_token = hit.token
    else:
        cache_token = key_cache.token()
        try:
            api_key = (
                APIKey.objects.dangerously_unscoped()  # the key is how we learn the tenant
                .select_related("organization", "member", "member__user")
                .get(prefix=prefix)
            )
        except APIKey.DoesNotExist:
            api_key = None
    now = timezone.now()
    api_key = checked(token, api_key, now)
    if _touch(api_key, now) or not cached:
        key_cache.put(api_key, cache_token)
    return api_key


def _prefix(token: str) -> str:
    prefix = keys.parse_prefix(token)
    if prefix is None:
        raise _failed(
            "Malformed API key: Atelier keys look like 'atl_live_…' "
            "(check for a truncated or mistyped key)."
        )
    return prefix


def cached_key(token: str) -> APIKey | None:
    """The key for this token from this process's cache, checked, if that needs no
    database (a hit whose last use is recent); None means: look it up (in a thread).
    Raises AuthenticationFailed as the lookup does. For the event loop, which only
    reads the key: the object is shared (`KeyCache.peek`), never to be changed."""
    api_key = key_cache.peek(_prefix(token))
    if api_key is None:
        return None
    now = timezone.now()
    api_key = checked(token, api_key, now)
    resolution = timedelta(seconds=settings.API_KEY_LAST_USED_RESOLUTION_SECONDS)
    if api_key.last_used_at is None or now - api_key.last_used_at >= resolution:
        return None  # a use to record: the database
    return api_key


def checked(token: str, api_key: APIKey | None, now: datetime) -> APIKey:
    """The key if the token matches it and it may be used now; else AuthenticationFailed."""
    if api_key is None or not keys.verify(token, api_key.hashed_key):
        raise _failed("Incorrect API key provided.")
    if api_key.revoked_at is not None:
        raise _failed("This API key has been revoked.", code="api_key_revoked")
    if api_key.expires_at is not None and api_key.expires_at <= now:
        if api_key.rotated_at is not None:
            raise _failed(
                f"This API key was rotated; its grace period ended at "
                f"{api_key.expires_at.isoformat()}. Use the new key.",
                code="api_key_rotated",
            )
        raise _failed(
            f"This API key expired at {api_key.expires_at.isoformat()}.",
            code="api_key_expired",
        )
    if api_key.member is not None and not api_key.member.user.is_active:
        raise _failed("The member this API key belongs to is deactivated.")
    return api_key


def principal_for(api_key: APIKey) -> Principal:
    membership = api_key.member
    return Principal(
        api_key=api_key,
        organization=api_key.organization,
        membership=membership,
        scopes=effective(api_key.scopes, membership.role if membership else None),
    )


def _touch(api_key: APIKey, now: datetime) -> bool:
    """Record the use if the last recorded one is older than the resolution; True if written."""
    resolution = timedelta(seconds=settings.API_KEY_LAST_USED_RESOLUTION_SECONDS)
    if api_key.last_used_at is not None and now - api_key.last_used_at < resolution:
        return False
    # Conditional update: concurrent requests with one key write once per window.
    stale = Q(last_used_at__isnull=True) | Q(last_used_at__lt=now - resolution)
    APIKey.objects.dangerously_unscoped().filter(stale, pk=api_key.pk).update(last_used_at=now)
    api_key.last_used_at = now
    return True
