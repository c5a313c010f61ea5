"""The limits' Redis keys (their clients are `core.redis_clients`')."""

from __future__ import annotations

from django.conf import settings


def key(*parts: str) -> str:
    return ":".join((settings.LIMITS_KEY_PREFIX, *parts))
