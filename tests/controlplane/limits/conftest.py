from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from django.conf import settings

from controlplane.billing.models import Plan
from controlplane.billing.plans import plan_cache_clear
from controlplane.core.redis_clients import sync_client
from controlplane.limits.budgets import budgets_cache_clear
from controlplane.limits.resolve import limits_cache_clear


@pytest.fixture(autouse=True)
def _own_redis_keys() -> Iterator[None]:
    """Every test gets its own key prefix in the real Redis, deleted afterwards."""
    old = settings.LIMITS_KEY_PREFIX
    prefix = f"atelier-test-limits-{os.getpid()}-{os.urandom(4).hex()}"
    settings.LIMITS_KEY_PREFIX = prefix
    limits_cache_clear()
    budgets_cache_clear()
    plan_cache_clear()
    try:
        yield
    finally:
        client = sync_client()
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        if keys:
            client.delete(*keys)
        settings.LIMITS_KEY_PREFIX = old
        limits_cache_clear()
        budgets_cache_clear()
        plan_cache_clear()


@pytest.fixture
def free_plan(db: None) -> Plan:
    """The `free` plan with known limits (organizations start on it)."""
    plan, _ = Plan.objects.update_or_create(
        code="free",
        defaults={
            "name": "Free",
            "requests_per_minute": 20,
            "tokens_per_minute": 40_000,
            "requests_per_day": 1_000,
            "concurrent_fine_tuning_jobs": 1,
        },
    )
    return plan
