"""The rate limiter against the real Redis: GCRA windows for a key and its organization."""

from __future__ import annotations

import asyncio
import hashlib
import math
import re
import time
import uuid

import pytest
from asgiref.sync import async_to_sync

from controlplane.core.redis_clients import async_client, sync_client
from controlplane.limits.ratelimit import (
    Decision,
    Limits,
    RateLimitExceeded,
    aadjust,
    acheck,
    format_reset,
)

#: What a sync caller (a DRF view) does.
check, adjust = async_to_sync(acheck), async_to_sync(aadjust)

ORG = "org_test"
KEY = "key_test"


def _check(limits: Limits, tokens: int = 0, key: str | None = KEY) -> Decision:
    return check(organization_id=ORG, api_key_id=key, tokens=tokens, limits=limits)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (0.02, "20ms"),
        (0.0201, "21ms"),
        (1, "1s"),
        (1.5, "1.5s"),
        (59.999, "59.999s"),
        (360, "6m0s"),
        (361.25, "6m1.25s"),
        (3600, "1h0m0s"),
        (86_399, "23h59m59s"),
    ],
)
def test_reset_is_written_the_way_openai_writes_it(seconds: float, text: str) -> None:
    assert format_reset(seconds) == text


def test_a_key_gets_exactly_its_requests_per_minute_then_a_429_naming_it() -> None:
    limits = Limits(key_requests_per_minute=5)
    remaining = [int(_check(limits).headers()["x-ratelimit-remaining-requests"]) for _ in range(5)]
    assert remaining == [4, 3, 2, 1, 0]

    with pytest.raises(RateLimitExceeded) as refused:
        _check(limits)

    error = refused.value
    assert error.status_code == 429
    assert error.code == "rate_limit_exceeded"
    assert "API key's requests/min limit (5)" in str(error.detail)
    assert "Retry in" in str(error.detail)
    # One request comes back every 12 s: the wait is at most that, in whole seconds.
    assert error.retry_after is not None
    assert 1 <= error.retry_after <= 12
    assert error.headers()["Retry-After"] == str(error.retry_after)
    assert error.headers()["x-ratelimit-remaining-requests"] == "0"


def test_headers_carry_limit_remaining_and_reset_for_requests_and_tokens() -> None:
    limits = Limits(key_requests_per_minute=60, key_tokens_per_minute=1000)
    headers = _check(limits, tokens=250).headers()
    assert headers["x-ratelimit-limit-requests"] == "60"
    assert headers["x-ratelimit-remaining-requests"] == "59"
    # One request of 60/min refills in one second; 250 of 1000 tokens/min in 15 s.
    assert headers["x-ratelimit-reset-requests"] in ("1s", "999ms")
    assert headers["x-ratelimit-limit-tokens"] == "1000"
    assert headers["x-ratelimit-remaining-tokens"] == "750"
    assert headers["x-ratelimit-reset-tokens"] in ("15s", "14.999s")


def test_no_limits_means_no_redis_and_no_headers() -> None:
    decision = _check(Limits())
    assert decision.headers() == {}


def test_the_organization_limit_binds_across_keys_and_is_named() -> None:
    limits = Limits(organization_requests_per_minute=3, key_requests_per_minute=100)
    _check(limits, key="key_a")
    _check(limits, key="key_b")
    _check(limits, key="key_c")
    with pytest.raises(RateLimitExceeded) as refused:
        _check(limits, key="key_d")
    assert "organization's requests/min limit (3)" in str(refused.value.detail)


def test_tokens_per_minute_refuses_and_a_refused_request_charges_nothing() -> None:
    limits = Limits(key_requests_per_minute=100, key_tokens_per_minute=1000)
    _check(limits, tokens=900)
    with pytest.raises(RateLimitExceeded) as refused:
        _check(limits, tokens=200)
    assert "API key's tokens/min limit (1000)" in str(refused.value.detail)
    # The refused request took neither a request nor tokens: 100 tokens still fit.
    headers = _check(limits, tokens=100).headers()
    assert headers["x-ratelimit-remaining-requests"] == "98"
    assert headers["x-ratelimit-remaining-tokens"] == "0"


def test_adjust_gives_back_unused_tokens_and_charges_an_underestimate() -> None:
    limits = Limits(key_tokens_per_minute=1000)
    decision = _check(limits, tokens=800)
    adjust(decision, 100)  # the request used far less than prompt + max_tokens
    assert _check(limits, tokens=850).headers()["x-ratelimit-remaining-tokens"] == "50"

    second = _check(limits, tokens=0)
    adjust(second, 500)  # an estimate can be beaten: the excess is charged anyway
    with pytest.raises(RateLimitExceeded):
        _check(limits, tokens=1)


def test_a_request_larger_than_the_window_is_refused_without_waiting_advice() -> None:
    limits = Limits(key_tokens_per_minute=1000)
    with pytest.raises(RateLimitExceeded) as refused:
        _check(limits, tokens=1001)
    assert "Request too large" in str(refused.value.detail)
    assert refused.value.retry_after is None
    assert _check(limits, tokens=1000).headers()["x-ratelimit-remaining-tokens"] == "0"


def test_requests_per_day_say_when_to_retry_in_hours() -> None:
    limits = Limits(key_requests_per_day=2)
    _check(limits)
    _check(limits)
    with pytest.raises(RateLimitExceeded) as refused:
        _check(limits)
    assert "API key's requests/day limit (2)" in str(refused.value.detail)
    # One request of 2/day comes back after 12 hours.
    assert refused.value.retry_after is not None
    assert 11 * 3600 < refused.value.retry_after <= 12 * 3600
    assert re.search(r"Retry in (11h59m[\d.]+s|12h0m0s),", str(refused.value.detail))


def test_the_window_refills_continuously() -> None:
    limits = Limits(key_requests_per_minute=60)  # one request back per second
    for _ in range(60):
        _check(limits)
    with pytest.raises(RateLimitExceeded) as refused:
        _check(limits)
    assert refused.value.retry_after == 1
    time.sleep(1.05)  # Redis's clock decides: one request's worth has come back
    _check(limits)
    with pytest.raises(RateLimitExceeded):
        _check(limits)


def test_acheck_and_check_share_one_state() -> None:
    limits = Limits(key_requests_per_minute=4, key_tokens_per_minute=100)

    async def run() -> list[str]:
        first = await acheck(organization_id=ORG, api_key_id=KEY, tokens=50, limits=limits)
        await aadjust(first, 10)
        second = await acheck(organization_id=ORG, api_key_id=KEY, tokens=10, limits=limits)
        return [
            first.headers()["x-ratelimit-remaining-tokens"],
            second.headers()["x-ratelimit-remaining-tokens"],
        ]

    assert asyncio.run(run()) == ["50", "80"]
    _check(limits, tokens=0)
    _check(limits, tokens=0)
    with pytest.raises(RateLimitExceeded):
        asyncio.run(acheck(organization_id=ORG, api_key_id=KEY, tokens=0, limits=limits))


def _count_round_trips(client: object) -> list[int]:
    """Counts commands sent on the limits' own asyncio Redis connections (real server,
    real replies)."""
    calls = [0]
    pool = client.connection_pool  # type: ignore[attr-defined]
    original = pool.get_connection

    async def counting_get_connection(*args: object, **kwargs: object) -> object:
        connection = await original(*args, **kwargs)
        if not getattr(connection, "_counted", False):
            send = connection.send_packed_command

            async def counted(command: object, check_health: bool = True) -> None:
                calls[0] += 1
                await send(command, check_health)

            connection.send_packed_command = counted
            connection._counted = True
        return connection

    pool.get_connection = counting_get_connection
    return calls


def test_one_check_is_one_round_trip_to_redis() -> None:
    limits = Limits(
        organization_requests_per_minute=1000,
        organization_tokens_per_minute=100_000,
        organization_requests_per_day=10_000,
        key_requests_per_minute=1000,
        key_tokens_per_minute=100_000,
        key_requests_per_day=10_000,
    )

    async def fifty_checks() -> int:
        one = {"organization_id": ORG, "api_key_id": KEY, "tokens": 10, "limits": limits}
        await acheck(**one)  # loads the script if Redis did not have it
        client, _ = async_client()
        calls = _count_round_trips(client)
        for _ in range(50):
            await acheck(**one)
        return calls[0]

    before = _evalsha_calls()
    assert asyncio.run(fifty_checks()) == 50
    assert _evalsha_calls() - before >= 50  # the server saw EVALSHA, not EVAL


def test_a_script_redis_does_not_have_is_loaded_on_noscript(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A script Redis has never seen (what a restart or SCRIPT FLUSH leaves), without
    # flushing the scripts of everyone else who shares this Redis server.
    from controlplane.core import redis_clients
    from controlplane.limits import ratelimit

    source = ratelimit._CHECK + f"\n-- {uuid.uuid4()}\n"
    monkeypatch.setattr(ratelimit, "_CHECK", source)
    monkeypatch.setattr(redis_clients, "_sync_scripts", {})
    sha = hashlib.sha1(source.encode()).hexdigest()
    assert sync_client().script_exists(sha) == [False]
    limits = Limits(key_requests_per_minute=10)
    _check(limits)
    assert sync_client().script_exists(sha) == [True]
    assert _check(limits).headers()["x-ratelimit-remaining-requests"] == "8"


def _evalsha_calls() -> int:
    stats = sync_client().info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


def test_remaining_never_leaves_zero_to_limit() -> None:
    limits = Limits(key_requests_per_minute=7)  # an interval that is not a whole μs
    for n in range(7):
        remaining = int(_check(limits).headers()["x-ratelimit-remaining-requests"])
        assert remaining == 6 - n
    with pytest.raises(RateLimitExceeded) as refused:
        _check(limits)
    assert refused.value.retry_after == math.ceil(60 / 7)
