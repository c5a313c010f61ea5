"""Rate limits: requests/min, tokens/min and requests/day, per API key and per organization.

Algorithm: GCRA (the generic cell rate algorithm, i.e. a token bucket kept as one
number). Each window is one Redis string, the "theoretical arrival time" (TAT) in
microseconds. A limit of L per window W lets a full burst of L through at once and
then refills continuously at L/W. Why GCRA rather than fixed or sliding windows:

- exact: a fixed window admits up to 2L around a boundary; a sliding-window
  *counter* is an approximation; a sliding *log* stores one entry per request
  (a day of requests is a large sorted set). GCRA never admits more than L in
  any span of W, in O(1) memory per window;
- its reset time is exact and is what OpenAI's `x-ratelimit-reset-*` headers
  mean ("time until the limit is back to its full capacity"): `TAT - now`;
- tokens are just a weighted cost, and correcting a reservation afterwards
  (`aadjust`) is moving the TAT by the difference.

One Lua script checks *all* windows of the key and its organization and, only if
every one admits the request, advances them all: one round trip (EVALSHA), no
lost updates between concurrent web processes, and nothing charged when any
window refuses. The clock is Redis's own (`TIME`), so every web process and
replica agrees on it. Keys share the `{organization}` hash tag, so the script
stays valid on Redis Cluster.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from django.conf import settings
from rest_framework import status

from controlplane.core import metrics
from controlplane.core.errors import ApiError
from controlplane.core.redis_clients import async_script

from .keys import key

MINUTE = 60.0
DAY = 86_400.0

# KEYS: one GCRA state (TAT, μs) per window.
# ARGV: for window i: limit, window length (μs), cost (requests or tokens) at 3i-2..3i.
# Returns {refused window (0: admitted), wait μs, reset_1 μs, …, reset_n μs}.
_CHECK = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local n = #KEYS
local tats, news = {}, {}
local refused, wait = 0, 0
for i = 1, n do
  local limit = tonumber(ARGV[3 * i - 2])
  local window = tonumber(ARGV[3 * i - 1])
  local cost = tonumber(ARGV[3 * i])
  local tat = tonumber(redis.call('GET', KEYS[i]) or now)
  if tat < now then tat = now end
  local new = tat + cost * window / limit
  local late = new - window - now
  if late > 1 and late > wait then  -- 1 μs of slack for float rounding
    refused, wait = i, late
  end
  tats[i], news[i] = tat, new
end
local out = {refused, math.ceil(wait)}
for i = 1, n do
  if refused == 0 then
    if tonumber(ARGV[3 * i]) > 0 then
      redis.call('SET', KEYS[i], string.format('%.17g', news[i]),
                 'PX', math.ceil((news[i] - now) / 1000) + 1000)
    end
    out[i + 2] = math.ceil(news[i] - now)
  else
    out[i + 2] = math.ceil(tats[i] - now)
  end
end
return out
"""

# KEYS: token windows. ARGV: for window i: limit, window length (μs), delta (tokens).
# Moves each TAT by delta tokens (a refund never leaves a bucket fuller than full).
_ADJUST = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
for i = 1, #KEYS do
  local limit = tonumber(ARGV[3 * i - 2])
  local window = tonumber(ARGV[3 * i - 1])
  local delta = tonumber(ARGV[3 * i])
  local tat = tonumber(redis.call('GET', KEYS[i]) or now)
  if tat < now then tat = now end
  local new = tat + delta * window / limit
  if new <= now then
    redis.call('DEL', KEYS[i])
  else
    redis.call('SET', KEYS[i], string.format('%.17g', new),
               'PX', math.ceil((new - now) / 1000) + 1000)
  end
end
return #KEYS
"""


@dataclass(frozen=True)
class Limits:
    """Resolved limits of one key within its organization; None means no limit."""

    organization_requests_per_minute: int | None = None
    organization_tokens_per_minute: int | None = None
    organization_requests_per_day: int | None = None
    key_requests_per_minute: int | None = None
    key_tokens_per_minute: int | None = None
    key_requests_per_day: int | None = None


@dataclass(frozen=True)
class Window:
    scope: str  # "key" | "organization"
    unit: str  # "requests" | "tokens"
    span: str  # "min" | "day"
    limit: int
    seconds: float
    redis_key: str

    @property
    def label(self) -> str:
        """E.g. "the API key's requests/min limit (60)"."""
        owner = "API key's" if self.scope == "key" else "organization's"
        return f"the {owner} {self.unit}/{self.span} limit ({self.limit})"

    def cost(self, tokens: int) -> int:
        return tokens if self.unit == "tokens" else 1


@dataclass(frozen=True)
class WindowState:
    window: Window
    remaining: int
    reset_seconds: float


def windows_for(
    *, organization_id: str, api_key_id: str | None, limits: Limits
) -> tuple[Window, ...]:
    """The Redis windows a request by this key counts against (unlimited ones left out)."""
    return _windows(organization_id, api_key_id, limits, settings.LIMITS_KEY_PREFIX)


@functools.lru_cache(maxsize=4096)
def _windows(
    organization_id: str, api_key_id: str | None, limits: Limits, prefix: str
) -> tuple[Window, ...]:
    # Cached: building six keys and windows took ~30 μs a request, more than Python's share
    # of the round trip. `prefix` is part of the cache key so a changed setting is obeyed.
    spec = (
        ("organization", "requests", "min", limits.organization_requests_per_minute, MINUTE),
        ("organization", "tokens", "min", limits.organization_tokens_per_minute, MINUTE),
        ("organization", "requests", "day", limits.organization_requests_per_day, DAY),
        ("key", "requests", "min", limits.key_requests_per_minute, MINUTE),
        ("key", "tokens", "min", limits.key_tokens_per_minute, MINUTE),
        ("key", "requests", "day", limits.key_requests_per_day, DAY),
    )
    out: list[Window] = []
    for scope, unit, span, limit, seconds in spec:
        if limit is None or (scope == "key" and api_key_id is None):
            continue
        owner = f"key:{api_key_id}" if scope == "key" else "org"
        name = key("rl", f"{{{organization_id}}}", owner, f"{unit[0]}p{span[0]}")
        out.append(Window(scope, unit, span, limit, seconds, name))
    return tuple(out)


def format_reset(seconds: float) -> str:
    """A duration as OpenAI writes it in `x-ratelimit-reset-*`: "20ms", "1s", "6m0s", "1h2m3.5s"."""
    ms = max(0, math.ceil(seconds * 1000))
    if ms < 1000:
        return f"{ms}ms" if ms else "0s"
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs = f"{rest / 1000:.3f}".rstrip("0").rstrip(".")
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


def _binding(states: Sequence[WindowState], unit: str) -> WindowState | None:
    """The window of `unit` that runs out first: least remaining, then longest reset."""
    candidates = [s for s in states if s.window.unit == unit]
    if not candidates:
        return None
    return min(candidates, key=lambda s: (s.remaining, -s.reset_seconds))


@dataclass(frozen=True)
class Decision:
    """What one `acheck` found: the state of every window after this request.

    `tokens` is what was reserved; hand the decision to `aadjust` with the actual
    count once the request is done.
    """

    organization_id: str
    api_key_id: str | None
    tokens: int
    states: tuple[WindowState, ...] = field(default_factory=tuple)

    def headers(self) -> dict[str, str]:
        """`x-ratelimit-{limit,remaining,reset}-{requests,tokens}` of the binding windows.

        A unit without any limit (all its windows unlimited) gets no headers.
        """
        out: dict[str, str] = {}
        for unit in ("requests", "tokens"):
            state = _binding(self.states, unit)
            if state is not None:
                out[f"x-ratelimit-limit-{unit}"] = str(state.window.limit)
                out[f"x-ratelimit-remaining-{unit}"] = str(state.remaining)
                out[f"x-ratelimit-reset-{unit}"] = format_reset(state.reset_seconds)
        return out


class RateLimitExceeded(ApiError):
    """429 `rate_limit_exceeded`, naming the limit; `retry_after` becomes `Retry-After`."""

    status_code = status.HTTP_429_TOO_MANY_REQUESTS
    default_code = "rate_limit_exceeded"

    def __init__(
        self,
        message: str,
        *,
        window: Window | None,
        retry_after: float | None,
        decision: Decision | None,
    ) -> None:
        super().__init__(message, code="rate_limit_exceeded")
        self.window = window
        #: Whole seconds (rounded up); None when waiting cannot help (a request too large).
        self.retry_after = None if retry_after is None else max(1, math.ceil(retry_after))
        self.decision = decision

    def headers(self) -> dict[str, str]:
        out = self.decision.headers() if self.decision is not None else {}
        if self.retry_after is not None:
            out["Retry-After"] = str(self.retry_after)
        return out


def _too_large(windows: Sequence[Window], tokens: int) -> None:
    for window in windows:
        if window.unit == "tokens" and tokens > window.limit:
            metrics.RATE_LIMIT_REFUSALS.labels(reason="request_too_large").inc()
            raise RateLimitExceeded(
                f"Request too large: it may use {tokens} tokens (prompt + max_tokens), more "
                f"than {window.label} allows in a whole minute. Lower max_tokens or shorten "
                "the prompt.",
                window=window,
                retry_after=None,
                decision=None,
            )


def _check_args(windows: Sequence[Window], tokens: int) -> tuple[list[str], list[Any]]:
    keys = [w.redis_key for w in windows]
    args: list[Any] = []
    for w in windows:
        args += [w.limit, int(w.seconds * 1_000_000), w.cost(tokens)]
    return keys, args


def _decide(
    reply: Sequence[int],
    windows: Sequence[Window],
    *,
    organization_id: str,
    api_key_id: str | None,
    tokens: int,
) -> Decision:
    refused, wait_us = int(reply[0]), int(reply[1])
    states = []
    for window, reset_us in zip(windows, reply[2:], strict=True):
        window_us = window.seconds * 1_000_000
        per_unit = window_us / window.limit
        # +1 μs: the reset was rounded up to whole μs (the script allows the same slack).
        remaining = math.floor((window_us - int(reset_us) + 1) / per_unit)
        states.append(
            WindowState(window, max(0, min(window.limit, remaining)), int(reset_us) / 1e6)
        )
    decision = Decision(organization_id, api_key_id, tokens, tuple(states))
    if refused:
        window = windows[refused - 1]
        wait = wait_us / 1e6
        metrics.RATE_LIMIT_REFUSALS.labels(
            reason=f"{window.scope}_{window.unit}_per_{window.span}"
        ).inc()
        raise RateLimitExceeded(
            f"Rate limit reached: {window.label} is used up. Retry in "
            f"{format_reset(wait)}, or ask an organization owner to raise the limit.",
            window=window,
            retry_after=wait,
            decision=decision,
        )
    return decision


async def acheck(
    *, organization_id: str, api_key_id: str | None, tokens: int, limits: Limits
) -> Decision:
    """Count one request (and `tokens` reserved) against every window of the key and org.

    Contract: one Redis round trip (EVALSHA). Returns the Decision (for
    `headers()` and, later, `aadjust`); raises `RateLimitExceeded` (429
    `rate_limit_exceeded`, with `retry_after` and `.headers()`) when any window
    is used up — then nothing is charged to any window. `tokens` is the
    request's estimate: prompt tokens + max_tokens (0 for a request that has no
    tokens). Sync callers (a DRF view) use `async_to_sync(acheck)`.
    """
    windows = windows_for(organization_id=organization_id, api_key_id=api_key_id, limits=limits)
    if not windows:
        return Decision(organization_id, api_key_id, tokens)
    _too_large(windows, tokens)
    keys, args = _check_args(windows, tokens)
    reply = await async_script("ratelimit.check", _CHECK)(keys=keys, args=args)
    return _decide(
        reply, windows, organization_id=organization_id, api_key_id=api_key_id, tokens=tokens
    )


def _adjust_args(decision: Decision, actual_tokens: int) -> tuple[list[str], list[Any]] | None:
    if actual_tokens < 0:
        raise ValueError(f"actual_tokens must be >= 0, not {actual_tokens}")
    delta = actual_tokens - decision.tokens
    token_windows = [s.window for s in decision.states if s.window.unit == "tokens"]
    if delta == 0 or not token_windows:
        return None
    keys = [w.redis_key for w in token_windows]
    args: list[Any] = []
    for w in token_windows:
        args += [w.limit, int(w.seconds * 1_000_000), delta]
    return keys, args


async def aadjust(decision: Decision, actual_tokens: int) -> None:
    """Correct the tokens a request reserved to what it actually used (off the latency path).

    Contract: call once, after the request finished (or failed part-way), with
    the tokens it used. Fewer than reserved gives the difference back; more
    (a bad estimate) charges the excess, which can push the window past its
    limit so that the next requests wait. Never refuses; one round trip or none.
    """
    prepared = _adjust_args(decision, actual_tokens)
    if prepared is not None:
        await async_script("ratelimit.adjust", _ADJUST)(keys=prepared[0], args=prepared[1])
