"""Rate limits hold across web processes: two real ASGI servers share one Redis count."""

from __future__ import annotations

import threading
from collections import Counter
from pathlib import Path

import httpx
import pytest
from django.conf import settings

from controlplane.billing.models import Plan
from controlplane.limits.models import KeyLimits
from tests.support.people import sign_up
from tests.support.processes import asgi_server

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]


def test_two_web_processes_admit_exactly_the_limit_together(tmp_path: Path) -> None:
    Plan.objects.update_or_create(
        code="free",
        defaults={
            "name": "Free",
            "requests_per_minute": 100_000,
            "tokens_per_minute": 1_000_000,
            "requests_per_day": None,
            "concurrent_fine_tuning_jobs": 1,
        },
    )
    alice = sign_up("alice@acme.test", "Acme")
    api_key = alice.membership.api_keys.get()
    # 25 a day: the window refills one request per ~58 minutes, so the count is exact.
    KeyLimits.objects.create(organization=alice.organization, api_key=api_key, requests_per_day=25)
    env = {"LIMITS_KEY_PREFIX": settings.LIMITS_KEY_PREFIX, "LOG_LEVEL": "WARNING"}

    with (
        asgi_server(tmp_path / "one", **env) as one,
        asgi_server(tmp_path / "two", **env) as two,
    ):
        statuses: Counter[tuple[str, int]] = Counter()
        messages: set[str] = set()
        lock = threading.Lock()
        start = threading.Barrier(16)

        def client(url: str) -> None:
            headers = {"Authorization": f"Bearer {alice.key}"}
            with httpx.Client(base_url=url, headers=headers, timeout=30) as http:
                assert http.get("/v1/me").status_code == 200  # warm, and not rate limited
                start.wait()
                for _ in range(5):
                    response = http.get("/v1/organization/rate_limits")
                    with lock:
                        statuses[(url, response.status_code)] += 1
                        if response.status_code == 429:
                            messages.add(response.json()["error"]["message"])
                            assert response.json()["error"]["code"] == "rate_limit_exceeded"
                            assert int(response.headers["Retry-After"]) > 3000

        threads = [threading.Thread(target=client, args=(s.url,)) for s in [one, two] * 8]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    admitted = sum(n for (_, code), n in statuses.items() if code == 200)
    refused = sum(n for (_, code), n in statuses.items() if code == 429)
    assert (admitted, refused) == (25, 55), statuses
    # Each process alone saw 40 requests, more than the limit: had each counted on its
    # own they would have admitted 50 between them.
    for server in (one, two):
        assert statuses[(server.url, 200)] + statuses[(server.url, 429)] == 40
    assert all("API key's requests/day limit (25) is used up" in m for m in messages)
