"""Budgets: reserve a request's maximum cost before it runs, settle the actual cost after.

Each budget period is one Redis hash (`spent`, `reserved`, one field per open
reservation, one per alert sent) and a sorted set of reservation deadlines; both
share the `{organization}` hash tag. `reserve` is one Lua script over every
budget that covers the key (the organization's and the key's own): it first
releases reservations whose request died without settling, then refuses if a
hard budget has `spent + reserved >= amount`, else adds the reservation to all of
them. Because admission and reservation are one atomic step, N concurrent
requests at the boundary overshoot by at most one request's maximum cost (the
one admitted just below the line), whatever N and however many web processes.

Money travels to Redis as integer nano-dollars (costs rounded *up*), so Lua's
doubles stay exact up to $9M per period; budgets are capped at $1M.

What a budget counts: the inference spend (prompt and completion tokens at the
price book's prices) of the organization, or of the key for a key's budget, in
the period; training, compression and storage are invoiced but not budgeted.
The live path counts exactly that (a request's cost at settle) and the rebuild
from the ledger counts the same meters (`spend.BUDGETED_METERS`, the one place
the rule is written), so a rebuilt counter equals the live one.

Redis is not the record: when a period's hash is missing (Redis lost it), its
spend is rebuilt from the ledger (spend.ledger_spend) before the request is
admitted. Reservations open at that moment are forgotten, which can only let
through requests that were already running.

A settle Redis cannot take (redis-py has already retried the connection) is not
dropped: it is kept in the process and applied again by its next reserve or
settle (`limits.budget_settle_deferred`, then `limits.budget_settle_recovered`);
meanwhile its hold still counts against the budget, so the counter errs high,
never low, and converges once Redis answers.
"""

from __future__ import annotations

import calendar
import math
import secrets
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import ROUND_CEILING, Decimal
from typing import Any

import redis
import structlog
from asgiref.sync import sync_to_async
from django.conf import settings
from django.db.models import Q
from django.utils import timezone
from rest_framework import status

from controlplane.core import metrics
from controlplane.core.errors import ApiError
from controlplane.core.redis_clients import async_script, sync_client, sync_script
from controlplane.core.ttlcache import TTLCache

from .keys import key
from .models import Budget, BudgetKind, BudgetPeriod

log = structlog.get_logger(__name__)

NANO = Decimal(1_000_000_000)
#: Largest budget amount: keeps nano-dollar sums exact in Lua's doubles.
MAX_AMOUNT = Decimal(1_000_000)

# KEYS: per budget, its hash then its reservation set.
# ARGV: reservation id, max cost (nano), reservation ttl (ms),
#       then per budget: amount (nano), hard (1/0), expire-at (unix s).
# Returns {0} admitted, {1, i, spent, reserved} refused by budget i,
#         {2, i, …} budgets i… have no state yet (rebuild from the ledger, then retry).
_RESERVE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local n = #KEYS / 2
local missing = {2}
for i = 1, n do
  if redis.call('EXISTS', KEYS[2 * i - 1]) == 0 then missing[#missing + 1] = i end
end
if #missing > 1 then return missing end
for i = 1, n do
  local h, z = KEYS[2 * i - 1], KEYS[2 * i]
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', z, '-inf', now, 'LIMIT', 0, 100)) do
    local held = redis.call('HGET', h, 'r:' .. id)
    if held and held ~= 'x' then
      redis.call('HINCRBY', h, 'reserved', 0 - tonumber(held))  -- not -x: Redis refuses '-0'
      redis.call('HSET', h, 'r:' .. id, 'x')
    end
    redis.call('ZREM', z, id)
  end
end
for i = 1, n do
  local h = KEYS[2 * i - 1]
  local amount = tonumber(ARGV[3 + 3 * i - 2])
  if ARGV[3 + 3 * i - 1] == '1' then
    local spent = tonumber(redis.call('HGET', h, 'spent') or '0')
    local reserved = tonumber(redis.call('HGET', h, 'reserved') or '0')
    if spent + reserved >= amount then return {1, i, spent, reserved} end
  end
end
local id, cost = ARGV[1], tonumber(ARGV[2])
for i = 1, n do
  local h, z = KEYS[2 * i - 1], KEYS[2 * i]
  local expire_at = tonumber(ARGV[3 + 3 * i])
  redis.call('HINCRBY', h, 'reserved', cost)
  redis.call('HSET', h, 'r:' .. id, cost)
  redis.call('ZADD', z, now + tonumber(ARGV[3]), id)
  redis.call('EXPIREAT', h, expire_at)
  redis.call('EXPIREAT', z, expire_at)
end
return {0}
"""

# KEYS: per budget, its hash then its reservation set.
# ARGV: reservation id, actual cost (nano), then per budget: amount (nano), "50,80" thresholds.
# Returns per budget {spent after (-1: no state), thresholds newly crossed…}.
_SETTLE = """
local id, cost = ARGV[1], tonumber(ARGV[2])
local out = {}
for i = 1, #KEYS / 2 do
  local h, z = KEYS[2 * i - 1], KEYS[2 * i]
  local row = {-1}
  if redis.call('EXISTS', h) == 1 then
    local held = redis.call('HGET', h, 'r:' .. id)
    if held then
      if held ~= 'x' then
        redis.call('HINCRBY', h, 'reserved', 0 - tonumber(held))  -- not -x: Redis refuses '-0'
        redis.call('ZREM', z, id)
      end
      redis.call('HDEL', h, 'r:' .. id)
      redis.call('HINCRBY', h, 'spent', cost)
    end
    local spent = tonumber(redis.call('HGET', h, 'spent') or '0')
    row[1] = spent
    local amount = tonumber(ARGV[2 + 2 * i - 1])
    for pct in string.gmatch(ARGV[2 + 2 * i], '%d+') do
      if spent * 100 >= amount * tonumber(pct)
         and redis.call('HSETNX', h, 'a:' .. pct, 1) == 1 then
        row[#row + 1] = tonumber(pct)
      end
    end
  end
  out[i] = row
end
return out
"""

# KEYS: a budget period's hash. ARGV: spent (nano), expire-at (unix s). Sets it only if absent.
_INIT = """
if redis.call('HSETNX', KEYS[1], 'spent', ARGV[1]) == 1 then
  redis.call('HSET', KEYS[1], 'reserved', 0)
  redis.call('EXPIREAT', KEYS[1], tonumber(ARGV[2]))
  return 1
end
return 0
"""


def to_nano(usd: Decimal) -> int:
    """USD as integer nano-dollars, rounded up (a budget never under-counts)."""
    return int((Decimal(usd) * NANO).to_integral_value(rounding=ROUND_CEILING))


def from_nano(nano: int | float) -> Decimal:
    return Decimal(int(nano)) / NANO


@dataclass(frozen=True)
class BudgetSpec:
    """What enforcement needs of a Budget row (cached; no ORM object on the hot path)."""

    id: str
    name: str
    organization_id: str
    api_key_id: str | None
    amount: Decimal
    kind: str
    period: str
    period_days: int | None
    anchor: datetime
    alert_thresholds: tuple[int, ...]

    @classmethod
    def of(cls, budget: Budget) -> BudgetSpec:
        return cls(
            id=budget.pk,
            name=budget.name,
            organization_id=budget.organization_id,
            api_key_id=budget.api_key_id,
            amount=budget.amount,
            kind=budget.kind,
            period=budget.period,
            period_days=budget.period_days,
            anchor=budget.anchor,
            alert_thresholds=tuple(sorted(int(t) for t in budget.alert_thresholds)),
        )

    @property
    def hard(self) -> bool:
        return self.kind == BudgetKind.HARD

    @property
    def title(self) -> str:
        who = f"API key {self.api_key_id}'s" if self.api_key_id else "the organization's"
        label = f" '{self.name}'" if self.name else ""
        every = (
            "calendar month (UTC)"
            if self.period == BudgetPeriod.MONTH
            else f"{self.period_days} days"
        )
        return f"{who} {self.kind} budget{label} ({self.id}: ${self.amount} per {every})"


def period_bounds(
    *, period: str, period_days: int | None, anchor: datetime, at: datetime
) -> tuple[datetime, datetime]:
    """The [start, end) of the budget period that contains `at` (UTC).

    `month`: calendar months in UTC. `days`: every `period_days` days from
    `anchor` (before the anchor, the periods run backwards from it the same way).
    """
    at = at.astimezone(UTC)
    if period == BudgetPeriod.MONTH:
        start = datetime(at.year, at.month, 1, tzinfo=UTC)
        days = calendar.monthrange(at.year, at.month)[1]
        return start, start + timedelta(days=days)
    if not period_days or period_days < 1:
        raise ValueError("a 'days' budget needs period_days >= 1")
    length = timedelta(days=period_days)
    anchor = anchor.astimezone(UTC)
    index = math.floor((at - anchor) / length)
    start = anchor + index * length
    return start, start + length


def spec_bounds(spec: BudgetSpec, at: datetime) -> tuple[datetime, datetime]:
    return period_bounds(
        period=spec.period, period_days=spec.period_days, anchor=spec.anchor, at=at
    )


# --- which budgets cover a key (cached in-process) ------------------------------------

_cache: TTLCache[tuple[str, str | None], tuple[BudgetSpec, ...]] = TTLCache(
    lambda: settings.LIMITS_CACHE_SECONDS
)


def budgets_cache_clear() -> None:
    _cache.clear()


def budgets_for(*, organization_id: str, api_key_id: str | None) -> tuple[BudgetSpec, ...]:
    """The organization's budgets and the key's own, cached for LIMITS_CACHE_SECONDS."""
    hit = _cache.get((organization_id, api_key_id))
    if hit is not None:
        return hit
    covering = Q(api_key__isnull=True)
    if api_key_id is not None:
        covering |= Q(api_key_id=api_key_id)
    specs = tuple(
        BudgetSpec.of(b)
        for b in Budget.objects.for_organization(organization_id).filter(covering).order_by("pk")
    )
    return _cache.put((organization_id, api_key_id), specs)


# --- reserve / settle -------------------------------------------------------------------


@dataclass(frozen=True)
class Held:
    """One budget period a reservation holds money in."""

    spec: BudgetSpec
    period_start: datetime
    period_end: datetime

    @property
    def hash_key(self) -> str:
        return key("bud", f"{{{self.spec.organization_id}}}", self.spec.id, self.stamp)

    @property
    def set_key(self) -> str:
        return self.hash_key + ":res"

    @property
    def stamp(self) -> str:
        return str(int(self.period_start.timestamp()))

    @property
    def expire_at(self) -> int:
        # A day after the period (late settles still land), then the key goes; never in the
        # past, where EXPIREAT would delete the state it just wrote.
        return int(max(self.period_end.timestamp(), time.time()) + 86_400)


@dataclass(frozen=True)
class Reservation:
    """Money held for one request; hand it to `asettle` once the request is done."""

    id: str
    organization_id: str
    api_key_id: str | None
    max_cost: Decimal
    held: tuple[Held, ...]


class InsufficientQuota(ApiError):
    """429 `insufficient_quota`: a hard budget is spent (waiting a minute won't help)."""

    status_code = status.HTTP_429_TOO_MANY_REQUESTS
    default_code = "insufficient_quota"

    def __init__(self, message: str, *, budget: BudgetSpec, resets_at: datetime) -> None:
        super().__init__(message, code="insufficient_quota")
        self.budget = budget
        self.resets_at = resets_at
        self.retry_after = max(1, math.ceil((resets_at - timezone.now()).total_seconds()))


def _held(specs: Sequence[BudgetSpec], at: datetime) -> tuple[Held, ...]:
    return tuple(Held(spec, *spec_bounds(spec, at)) for spec in specs)


def _reserve_args(
    held: Sequence[Held], reservation_id: str, max_cost: Decimal
) -> tuple[list[str], list[Any]]:
    keys: list[str] = []
    args: list[Any] = [
        reservation_id,
        to_nano(max_cost),
        int(settings.LIMITS_RESERVATION_TTL_SECONDS * 1000),
    ]
    for h in held:
        keys += [h.hash_key, h.set_key]
        args += [to_nano(h.spec.amount), "1" if h.spec.hard else "0", h.expire_at]
    return keys, args


def _settle_args(reservation: Reservation, actual_cost: Decimal) -> tuple[list[str], list[Any]]:
    if actual_cost < 0:
        raise ValueError(f"actual_cost must be >= 0, not {actual_cost}")
    keys: list[str] = []
    args: list[Any] = [reservation.id, to_nano(actual_cost)]
    for h in reservation.held:
        keys += [h.hash_key, h.set_key]
        args += [to_nano(h.spec.amount), ",".join(str(t) for t in h.spec.alert_thresholds)]
    return keys, args


def _refusal(held: Held, spent_nano: int, reserved_nano: int) -> InsufficientQuota:
    spec = held.spec
    spent = from_nano(spent_nano).quantize(Decimal("0.01"), rounding=ROUND_CEILING)
    in_flight = (
        f" (plus ${from_nano(reserved_nano).quantize(Decimal('0.01'), rounding=ROUND_CEILING)}"
        " held by requests in flight)"
        if reserved_nano
        else ""
    )
    return InsufficientQuota(
        f"You exceeded {spec.title}: ${spent} spent this period{in_flight}. It resets at "
        f"{held.period_end.strftime('%Y-%m-%dT%H:%M:%SZ')}; an owner or billing member can "
        "raise the budget before then.",
        budget=spec,
        resets_at=held.period_end,
    )


def _missing(held: Sequence[Held], reply: Sequence[int]) -> list[Held]:
    return [held[int(i) - 1] for i in reply[1:]]


def rebuild(target: Held) -> None:
    """Recreate a period's counter in Redis from the ledger (only if still absent)."""
    spent = ledger_spend_for(target)
    created = sync_script("budgets.init", _INIT)(
        keys=[target.hash_key], args=[to_nano(spent), target.expire_at]
    )
    log.info(
        "limits.budget_rebuilt",
        organization_id=target.spec.organization_id,
        budget_id=target.spec.id,
        spent=str(spent),
        created=bool(created),
    )


def ledger_spend_for(target: Held) -> Decimal:
    """What the ledger says the budget's period spent, counting what a budget counts."""
    from .spend import BUDGETED_METERS, ledger_spend

    return ledger_spend(
        organization_id=target.spec.organization_id,
        api_key_id=target.spec.api_key_id,
        start=target.period_start,
        end=target.period_end,
        meters=BUDGETED_METERS,
    )


def _outcome(
    reply: Sequence[Any], held: Sequence[Held], reservation: Reservation
) -> Reservation | None:
    """The reservation if admitted, None if a rebuild is needed; raises on refusal."""
    code = int(reply[0])
    if code == 0:
        return reservation
    if code == 1:
        target = held[int(reply[1]) - 1]
        log.info(
            "limits.budget_refused",
            organization_id=reservation.organization_id,
            api_key_id=reservation.api_key_id,
            budget_id=target.spec.id,
        )
        metrics.BUDGET_REFUSALS.labels(
            reason="key_budget" if target.spec.api_key_id else "organization_budget"
        ).inc()
        raise _refusal(target, int(reply[2]), int(reply[3]))
    return None


def _new_reservation(
    organization_id: str, api_key_id: str | None, max_cost: Decimal, held: tuple[Held, ...]
) -> Reservation:
    if max_cost < 0:
        raise ValueError(f"max_cost must be >= 0, not {max_cost}")
    return Reservation(
        id=secrets.token_hex(8),
        organization_id=organization_id,
        api_key_id=api_key_id,
        max_cost=Decimal(max_cost),
        held=held,
    )


async def areserve(
    *,
    organization_id: str,
    api_key_id: str | None,
    max_cost: Decimal,
    at: datetime | None = None,
) -> Reservation:
    """Hold `max_cost` USD in every budget covering the key, or refuse.

    Contract: call before running the request with its *maximum* cost (the lead
    computes it from the price book: prompt + max_tokens); then call `asettle`
    exactly once with the actual cost, also when the request failed (cost 0).
    Raises `InsufficientQuota` (429 `insufficient_quota`, distinct from
    `rate_limit_exceeded`) when a hard budget has spent + reserved >= amount;
    its message names the budget and when it resets. One Redis round trip
    (EVALSHA); two more per budget the first time a period is seen after Redis
    lost it (rebuilt from the ledger). No budgets: no round trip at all.
    `at` only decides the period (tests of rollover); Redis's clock runs the
    reservation deadlines. A database look-up (the budgets, a rebuild) runs in the
    process's database thread; sync callers use `async_to_sync(areserve)`.
    """
    specs = _cache.get((organization_id, api_key_id))
    if specs is None:
        specs = await sync_to_async(budgets_for)(
            organization_id=organization_id, api_key_id=api_key_id
        )
    held = _held(specs, at or timezone.now())
    reservation = _new_reservation(organization_id, api_key_id, max_cost, held)
    if not held:
        return reservation
    if _deferred:
        await _retry_deferred()
    keys, args = _reserve_args(held, reservation.id, max_cost)
    script = async_script("budgets.reserve", _RESERVE)
    for _ in range(3):
        reply = await script(keys=keys, args=args)
        admitted = _outcome(reply, held, reservation)
        if admitted is not None:
            return admitted
        for target in _missing(held, reply):
            await sync_to_async(rebuild)(target)
    raise RuntimeError("budget state vanished from Redis three times while reserving")


def _alerts(reservation: Reservation, reply: Sequence[Sequence[int]]) -> None:
    from .services import budget_alert_record

    for held, row in zip(reservation.held, reply, strict=True):
        for threshold in row[1:]:
            budget_alert_record(
                budget=held.spec,
                period_start=held.period_start,
                period_end=held.period_end,
                threshold=int(threshold),
                spent=from_nano(int(row[0])),
            )


async def asettle(reservation: Reservation, actual_cost: Decimal) -> None:
    """Replace a reservation by the request's actual cost (off the latency path).

    Contract: once per reservation, after the request ended, with its actual
    cost in USD (0 if it failed before costing anything). Idempotent: a second
    settle of the same reservation changes nothing. A settle that comes after
    the reservation expired (LIMITS_RESERVATION_TTL_SECONDS) still counts the
    spend. Crossing an alert threshold records the alert (audit event, email to
    owners and billing members) once per budget period. One round trip, plus
    database writes only when a threshold is crossed.

    Never loses the spend to Redis: when Redis cannot take the settle, it is
    deferred (a `limits.budget_settle_deferred` warning) and applied by the
    process's next reserve or settle; it raises only for a negative cost (and
    should recording an alert fail, after the spend was counted).
    """
    if not reservation.held:
        return
    keys, args = _settle_args(reservation, actual_cost)
    if _deferred:
        await _retry_deferred()
    try:
        reply = await async_script("budgets.settle", _SETTLE)(keys=keys, args=args)
    except redis.RedisError as error:
        _defer(reservation, actual_cost, error)
        return
    if any(len(row) > 1 for row in reply):
        await sync_to_async(_alerts)(reservation, reply)


# --- settles Redis could not take -------------------------------------------------------

#: Most settles a process keeps for later (each is a few hundred bytes).
DEFERRED_MAX = 10_000
#: Longest wait between two tries of a deferred settle (seconds).
DEFERRED_BACKOFF_MAX = 30.0


@dataclass
class _Deferred:
    reservation: Reservation
    cost: Decimal
    #: time.monotonic() before which it is not tried again (the first try: at once).
    next_try: float = 0.0
    backoff: float = 1.0

    @property
    def useless(self) -> bool:
        """Its periods' keys are gone (a day after the period): nothing to settle into."""
        last = max(h.period_end.timestamp() for h in self.reservation.held)
        return time.time() > last + 86_400


_deferred: deque[_Deferred] = deque()


def _defer(reservation: Reservation, cost: Decimal, error: Exception) -> None:
    fields = {
        "organization_id": reservation.organization_id,
        "api_key_id": reservation.api_key_id,
        "reservation_id": reservation.id,
        "cost": str(cost),
        "error": f"{type(error).__name__}: {error}",
    }
    if len(_deferred) >= DEFERRED_MAX:
        # Its hold expires after LIMITS_RESERVATION_TTL_SECONDS; a rebuild from the
        # ledger (which has the request's usage) is then the only correction.
        log.error("limits.budget_settle_dropped", deferred=len(_deferred), **fields)
        return
    _deferred.append(_Deferred(reservation, cost))
    log.warning("limits.budget_settle_deferred", deferred=len(_deferred), **fields)


def _due() -> list[_Deferred]:
    """The deferred settles to try now, taken off the queue (the others stay)."""
    now, due = time.monotonic(), list[_Deferred]()
    for _ in range(len(_deferred)):
        try:
            item = _deferred.popleft()
        except IndexError:  # another thread took the rest
            break
        if item.useless:
            log.error(
                "limits.budget_settle_abandoned",
                organization_id=item.reservation.organization_id,
                reservation_id=item.reservation.id,
                cost=str(item.cost),
            )
        elif item.next_try <= now:
            due.append(item)
        else:
            _deferred.append(item)
    return due


def _failed_again(items: Sequence[_Deferred]) -> None:
    now = time.monotonic()
    for item in items:
        item.next_try = now + item.backoff
        item.backoff = min(item.backoff * 2, DEFERRED_BACKOFF_MAX)
        _deferred.append(item)


def _recovered(item: _Deferred, reply: Sequence[Sequence[int]]) -> None:
    log.info(
        "limits.budget_settle_recovered",
        organization_id=item.reservation.organization_id,
        reservation_id=item.reservation.id,
        cost=str(item.cost),
    )
    try:  # another request's reserve or settle runs this: its alert must not fail them
        _alerts(item.reservation, reply)
    except Exception:
        log.exception("limits.budget_alert_failed", reservation_id=item.reservation.id)


async def _retry_deferred() -> None:
    """Apply the due deferred settles (idempotent: each counts once, whatever happened)."""
    due = _due()
    script = async_script("budgets.settle", _SETTLE)
    for i, item in enumerate(due):
        keys, args = _settle_args(item.reservation, item.cost)
        try:
            reply = await script(keys=keys, args=args)
        except redis.RedisError:
            _failed_again(due[i:])
            return
        if any(len(row) > 1 for row in reply):
            await sync_to_async(_recovered)(item, reply)
        else:
            _recovered(item, reply)  # no alert: no database


@dataclass(frozen=True)
class PeriodState:
    period_start: datetime
    period_end: datetime
    spent: Decimal
    reserved: Decimal


def budget_state(spec: BudgetSpec, *, at: datetime | None = None) -> PeriodState:
    """Spent and held in the budget's current period (Redis, or the ledger if Redis lost it)."""
    held = Held(spec, *spec_bounds(spec, at or timezone.now()))
    values = sync_client().hmget(held.hash_key, ["spent", "reserved"])
    if values[0] is None:
        return PeriodState(held.period_start, held.period_end, ledger_spend_for(held), Decimal(0))
    return PeriodState(
        held.period_start,
        held.period_end,
        from_nano(int(values[0])),
        from_nano(int(values[1] or 0)),
    )
