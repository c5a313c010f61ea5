"""Whether a request may run, and what it owes once it has: the billing side of a call.

Before a request is sent to a worker (`aadmit`, on the event loop: every step
cached or one Redis round trip):
1. a suspended organization (unpaid invoice past its grace period) is refused
   with 402 `billing_suspended` (`payments.access`, cached: no query);
2. the plan's caps on `max_tokens` and `n` apply (`billing.plans`, cached);
3. the rate limits of the key and its organization are checked and charged
   with the request's estimated tokens (prompt estimate + every completion
   token it may produce): one Redis round trip (`limits.ratelimit`);
4. its maximum cost (those tokens at the model's prices in force) is reserved
   against the budgets covering the key and organization (`limits.budgets`: no
   round trip when there are none); a hard budget that cannot cover it refuses
   with 429 `insufficient_quota`, after giving back the tokens charged in 3.

After it ended (`asettle_reported`, after the response): the reservation is
replaced by the actual cost and the rate limit's token charge corrected to the
actual count. "Actual" is what the worker reported in the request's final reply:
the call feeds the replies it reads to an `Outcome`, and a request whose caller
left before the end is settled once its worker's final reply comes, never at a
guess. Every exit after admission
settles: a request that never reached a worker is settled at zero (its hold
released). What the request is billed is not decided here: that is the usage
report the worker sends, stored once and written to the ledger.

The prompt is estimated at one token per four characters (what OpenAI's own
rate limiter does): the web process has no tokenizer, and the estimate only
sizes a reservation that the actual count then corrects.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

import redis
import structlog
from asgiref.sync import sync_to_async
from django.utils import timezone

from controlplane.billing.models import Meter
from controlplane.billing.plans import aplan_for
from controlplane.billing.prices import unit_prices
from controlplane.core.errors import ApiError
from controlplane.core.ttlcache import TTLCache
from controlplane.limits import budgets, ratelimit
from controlplane.limits.resolve import alimits_for
from controlplane.payments.access import ainference_refusal
from jobcontracts.inference import InferenceRequest, Reply

from .replies import ReplyTimeout, Subscription

log = structlog.get_logger(__name__)

#: Seconds a model's looked-up prices are reused (a new price applies this much later).
PRICE_CACHE_SECONDS = 30.0
_prices: TTLCache[str, tuple[Decimal, Decimal]] = TTLCache(lambda: PRICE_CACHE_SECONDS)


@dataclass
class Admission:
    request: InferenceRequest
    decision: ratelimit.Decision
    reservation: budgets.Reservation
    prices: tuple[Decimal, Decimal]  # USD per prompt token, per completion token

    def headers(self) -> dict[str, str]:
        return self.decision.headers()


def _estimate(request: InferenceRequest) -> tuple[int, int]:
    """(prompt tokens, most completion tokens) of a request, before tokenizing."""
    texts = [m.get("content", "") for m in request.messages or ()] or list(request.inputs)
    chars = sum(len(t) for t in texts if isinstance(t, str))
    prompts = 1 if request.messages is not None else max(1, len(request.inputs))
    prompt = math.ceil(chars / 4) + 4 * len(request.messages or ())  # chat framing
    if request.kind in ("chat", "completion"):
        return prompt, request.params.max_tokens * max(1, request.params.n) * prompts
    return prompt, 0


def _load_prices(model: str, at: datetime) -> tuple[Decimal, Decimal]:
    prompt, completion = unit_prices(model, (Meter.PROMPT_TOKENS, Meter.COMPLETION_TOKENS), at)
    return prompt, completion


def prices_cache_clear() -> None:
    _prices.clear()


async def aprices_for(model: str) -> tuple[Decimal, Decimal]:
    """USD per prompt and per completion token of `model` in force (cached)."""
    hit = _prices.get(model)
    if hit is not None:
        return hit
    return _prices.put(model, await sync_to_async(_load_prices)(model, timezone.now()))


def _caps(plan: Any, request: InferenceRequest) -> None:
    if request.kind not in ("chat", "completion"):
        return
    params = request.params
    if plan.max_tokens_cap is not None and params.max_tokens > plan.max_tokens_cap:
        raise ApiError(
            f"max_tokens ({params.max_tokens}) is above your plan's cap of "
            f"{plan.max_tokens_cap} tokens per request ({plan.name}). Ask for fewer tokens "
            "or upgrade the plan.",
            param="max_tokens",
            code="plan_limit_exceeded",
        )
    if plan.max_n is not None and params.n > plan.max_n:  # empty: no cap
        raise ApiError(
            f"n ({params.n}) is above your plan's cap of {plan.max_n} choices per request "
            f"({plan.name}).",
            param="n",
            code="plan_limit_exceeded",
        )


def _max_cost(request: InferenceRequest, prices: tuple[Decimal, Decimal]) -> Decimal:
    prompt, completion = _estimate(request)
    return prompt * prices[0] + completion * prices[1]


def _cost(usage: dict[str, Any] | None, prices: tuple[Decimal, Decimal]) -> tuple[int, Decimal]:
    usage = usage or {}
    prompt = int(usage.get("prompt_tokens") or 0)
    completion = int(usage.get("completion_tokens") or 0)
    return prompt + completion, prompt * prices[0] + completion * prices[1]


async def aadmit(request: InferenceRequest, organization: Any) -> Admission:
    """The checks before sending. Raises the refusal."""
    organization_id, key_id = request.organization_id, request.api_key_id
    refusal = await ainference_refusal(organization_id)
    if refusal is not None:
        raise refusal
    _caps(await aplan_for(organization), request)
    limits = await alimits_for(organization_id=organization_id, api_key_id=key_id)
    prompt, completion = _estimate(request)
    decision = await ratelimit.acheck(
        organization_id=organization_id,
        api_key_id=key_id,
        tokens=prompt + completion,
        limits=limits,
    )
    prices = await aprices_for(request.model.id)
    try:
        reservation = await budgets.areserve(
            organization_id=organization_id,
            api_key_id=key_id,
            max_cost=_max_cost(request, prices),
        )
    except Exception:
        # Refused (or Redis failed): it used none of the tokens it was charged.
        with contextlib.suppress(redis.RedisError):
            await ratelimit.aadjust(decision, 0)
        raise
    return Admission(request, decision, reservation, prices)


class Outcome:
    """What a request's worker has said, as far as settling goes: the call feeds it every
    reply it reads, and settles at its `usage`.

    `sent`: the request reached the worker queue (before that nothing can have run);
    `ended`: its final reply (`done` or `error`) was read; `usage`: what that reply
    reported (None: nothing reported, nothing used).
    """

    __slots__ = ("ended", "sent", "usage")

    def __init__(self) -> None:
        self.sent = False
        self.ended = False
        self.usage: dict[str, Any] | None = None

    def seen(self, reply: Reply) -> Reply:
        if reply.type in ("done", "error"):
            self.ended = True
            self.usage = reply.data.get("usage")
        return reply


async def asettle(admission: Admission, usage: dict[str, Any] | None) -> None:
    """Correct the budget hold and the token charge to what the request used (the usage
    its worker reported; None: nothing reported, e.g. never sent or the worker was lost:
    charged nothing). The budget goes first: a rate-limit correction that fails (the
    window forgets it within its span) must not cost the spend."""
    tokens, cost = _cost(usage, admission.prices)
    await budgets.asettle(admission.reservation, cost)
    try:
        await ratelimit.aadjust(admission.decision, tokens)
    except redis.RedisError as error:
        _adjust_failed(admission, error)


def _adjust_failed(admission: Admission, error: Exception) -> None:
    log.warning(
        "inference.ratelimit_adjust_failed",
        request_id=admission.request.request_id,
        organization_id=admission.request.organization_id,
        error=repr(error),
    )


async def asettle_reported(
    admission: Admission, outcome: Outcome, subscription: Subscription | None
) -> None:
    """Settle a request that is over for its caller at the usage its worker reports,
    then close its reply subscription. The one way a request is settled.

    Sent but its final reply not read (the caller left and the request was
    cancelled): the worker still ends it with a reply carrying the tokens it used;
    wait for that, within the subscription's deadlines, rather than guess. A worker
    that stays silent past them reported nothing: settled at zero, as is a request
    that was never sent. Never raises (a failure is logged).
    """
    try:
        if subscription is not None and outcome.sent and not outcome.ended:
            async for reply in subscription.areplies():
                outcome.seen(reply)
    except ReplyTimeout:
        pass  # the worker is gone: it used what it reported, or nothing
    except Exception as error:  # the reply channel failed: settle at what was read
        log.warning(
            "inference.final_reply_unread",
            request_id=admission.request.request_id,
            error=repr(error),
        )
    finally:
        if subscription is not None:
            with contextlib.suppress(Exception):
                await subscription.aclose()
    try:
        await asettle(admission, outcome.usage)
    except Exception:  # budgets.asettle kept the spend; an alert could not be recorded
        log.exception("inference.settle_failed", request_id=admission.request.request_id)
