"""Which limits apply to a key: its plan's, unless the key overrides them (cached in-process).

`limits_for` is on every inference request, so each process keeps the answer
for `LIMITS_CACHE_SECONDS`. A change saved in this process (a KeyLimits row, a
Plan, an organization's plan) clears the cache at once; other processes see it
within the TTL.
"""

from __future__ import annotations

from asgiref.sync import sync_to_async
from django.conf import settings

from controlplane.billing.plans import plan_for
from controlplane.core.ttlcache import TTLCache

from .models import KeyLimits
from .ratelimit import Limits

_cache: TTLCache[tuple[str, str | None], Limits] = TTLCache(lambda: settings.LIMITS_CACHE_SECONDS)


def limits_cache_clear() -> None:
    _cache.clear()


def _cached(organization_id: str, api_key_id: str | None) -> Limits | None:
    return _cache.get((organization_id, api_key_id))


def _resolve(organization_id: str, api_key_id: str | None) -> Limits:
    plan = plan_for(organization_id)
    override: KeyLimits | None = None
    if api_key_id is not None:
        override = (
            KeyLimits.objects.for_organization(organization_id)
            .filter(api_key_id=api_key_id)
            .first()
        )

    def pick(name: str) -> int | None:
        own: int | None = getattr(override, name, None) if override is not None else None
        fallback: int | None = getattr(plan, name)
        return own if own is not None else fallback

    return Limits(
        organization_requests_per_minute=plan.requests_per_minute,
        organization_tokens_per_minute=plan.tokens_per_minute,
        organization_requests_per_day=plan.requests_per_day,
        key_requests_per_minute=pick("requests_per_minute") if api_key_id else None,
        key_tokens_per_minute=pick("tokens_per_minute") if api_key_id else None,
        key_requests_per_day=pick("requests_per_day") if api_key_id else None,
    )


def limits_for(*, organization_id: str, api_key_id: str | None) -> Limits:
    """The rate limits of `api_key_id` in `organization_id`: the plan's, overridden per key.

    Contract: organization windows come from the organization's plan; each key
    window is the key's KeyLimits field, or the plan's value when that field is
    null. `api_key_id` None (a request without a key) has organization windows
    only. A cache hit costs no query; a miss costs two or three (plan code,
    plan, override). Blocking on a miss: from asyncio call `alimits_for`.
    """
    hit = _cached(organization_id, api_key_id)
    if hit is not None:
        return hit
    return _cache.put((organization_id, api_key_id), _resolve(organization_id, api_key_id))


async def alimits_for(*, organization_id: str, api_key_id: str | None) -> Limits:
    """`limits_for` for asyncio handlers: a cache hit stays on the loop, a miss goes to a thread."""
    hit = _cached(organization_id, api_key_id)
    if hit is not None:
        return hit
    return await sync_to_async(limits_for)(organization_id=organization_id, api_key_id=api_key_id)
