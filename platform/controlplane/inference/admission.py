"""Whether a request may run, and what it owes once it has: the billing side of a call.

Before a request is sent to a worker (`admit`):
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

After it ended (`settle`, off the latency path): the rate limit's token charge
is corrected to the actual count and the reservation replaced by the actual
cost. What the request is billed is not decided here: that is the usage
report the worker sends, stored once and written to the ledger.

The prompt is estimated at one token per four characters (what OpenAI's own
rate limiter does): the web process has no tokenizer, and the estimate only
sizes a reservation that the actual count then corrects.

Without Redis (the embedded `make run`: one process, one user) there are no
rate limits or budgets to share, so only steps 1 and 2 apply.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db.models import Q
from django.utils import timezone

from controlplane.billing.models import WILDCARD, Meter, PriceBookEntry
from controlplane.billing.plans import aplan_for, plan_for
from controlplane.core.errors import ApiError
from controlplane.limits import budgets, ratelimit
from controlplane.limits.resolve import alimits_for, limits_for
from controlplane.payments.access import ainference_refusal, inference_refusal
from jobcontracts.inference import InferenceRequest

#: Seconds a model's looked-up prices are reused (a new price applies this much later).
PRICE_CACHE_SECONDS = 30.0
_prices: dict[str, tuple[float, tuple[Decimal, Decimal]]] = {}


@dataclass
class Admission:
    request: InferenceRequest
    #: None: embedded mode, no limits (see the module's docstring).
    decision: ratelimit.Decision | None
    reservation: budgets.Reservation | None
    prices: tuple[Decimal, Decimal]  # USD per prompt token, per completion token

    def headers(self) -> dict[str, str]:
        return self.decision.headers() if self.decision is not None else {}


def _estimate(request: InferenceRequest) -> tuple[int, int]:
    """(prompt tokens, most completion tokens) of a request, before tokenizing."""
    texts = [m.get("content", "") for m in request.messages or ()] or list(request.inputs)
    chars = sum(len(t) for t in texts if isinstance(t, str))
    prompts = 1 if request.messages is not None else max(1, len(request.inputs))
    prompt = math.ceil(chars / 4) + 4 * len(request.messages or ())  # chat framing
    if request.kind in ("chat", "completion"):
        return prompt, request.params.max_tokens * max(1, request.params.n) * prompts
    return prompt, 0


def estimated_usage(request: InferenceRequest) -> dict[str, int]:
    """The most a request may have used, for settling one whose actual usage is unknown."""
    prompt, completion = _estimate(request)
    return {"prompt_tokens": prompt, "completion_tokens": completion}


def _load_prices(model: str, at: datetime) -> tuple[Decimal, Decimal]:
    in_force = Q(effective_from__lte=at) & (Q(effective_to__isnull=True) | Q(effective_to__gt=at))
    rows = PriceBookEntry.objects.filter(
        in_force,
        meter__in=[Meter.PROMPT_TOKENS, Meter.COMPLETION_TOKENS],
        model__in=[model, WILDCARD],
    )
    found: dict[tuple[str, bool], Decimal] = {}
    for row in rows:
        found[(row.meter, row.model == model)] = row.unit_price / row.per_units

    def price(meter: str) -> Decimal:
        return found.get((meter, True), found.get((meter, False), Decimal(0)))

    return price(Meter.PROMPT_TOKENS), price(Meter.COMPLETION_TOKENS)


def _cached_prices(model: str) -> tuple[Decimal, Decimal] | None:
    hit = _prices.get(model)
    return hit[1] if hit is not None and hit[0] > time.monotonic() else None


def _remember(model: str, prices: tuple[Decimal, Decimal]) -> tuple[Decimal, Decimal]:
    _prices[model] = (time.monotonic() + PRICE_CACHE_SECONDS, prices)
    return prices


def prices_for(model: str) -> tuple[Decimal, Decimal]:
    return _cached_prices(model) or _remember(model, _load_prices(model, timezone.now()))


async def aprices_for(model: str) -> tuple[Decimal, Decimal]:
    hit = _cached_prices(model)
    if hit is not None:
        return hit
    loaded = await sync_to_async(_load_prices, thread_sensitive=False)(model, timezone.now())
    return _remember(model, loaded)


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
    if params.n > plan.max_n:
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


def admit(request: InferenceRequest) -> Admission:
    """The checks before sending (blocking: the DRF views). Raises the refusal."""
    organization_id, key_id = request.organization_id, request.api_key_id
    refusal = inference_refusal(organization_id)
    if refusal is not None:
        raise refusal
    _caps(plan_for(organization_id), request)
    if not settings.REDIS_URL:
        return Admission(request, None, None, (Decimal(0), Decimal(0)))
    limits = limits_for(organization_id=organization_id, api_key_id=key_id)
    prompt, completion = _estimate(request)
    decision = ratelimit.check(
        organization_id=organization_id,
        api_key_id=key_id,
        tokens=prompt + completion,
        limits=limits,
    )
    prices = prices_for(request.model.id)
    try:
        reservation = budgets.reserve(
            organization_id=organization_id,
            api_key_id=key_id,
            max_cost=_max_cost(request, prices),
        )
    except budgets.InsufficientQuota:
        ratelimit.adjust(decision, 0)  # refused: it used none of the tokens it was charged
        raise
    return Admission(request, decision, reservation, prices)


async def aadmit(request: InferenceRequest, organization: Any) -> Admission:
    """`admit` on the event loop (every step cached or one Redis round trip)."""
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
    except budgets.InsufficientQuota:
        await ratelimit.aadjust(decision, 0)
        raise
    return Admission(request, decision, reservation, prices)


def settle(admission: Admission, usage: dict[str, Any] | None) -> None:
    """Correct the token charge and the budget hold to what the request used (its
    reply's usage; None: nothing known, e.g. the worker was lost: charged nothing)."""
    if admission.decision is None or admission.reservation is None:
        return
    tokens, cost = _cost(usage, admission.prices)
    ratelimit.adjust(admission.decision, tokens)
    budgets.settle(admission.reservation, cost)


async def asettle(admission: Admission, usage: dict[str, Any] | None) -> None:
    if admission.decision is None or admission.reservation is None:
        return
    tokens, cost = _cost(usage, admission.prices)
    await ratelimit.aadjust(admission.decision, tokens)
    await budgets.asettle(admission.reservation, cost)
