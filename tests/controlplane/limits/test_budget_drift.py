"""Budget counters that must not drift from the truth: a settle Redis refused, and the
counter rebuilt from the ledger after spend of every kind. Real Redis and PostgreSQL;
an unreachable Redis is a real client pointed at a port nobody listens on."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
import redis
import redis.asyncio
from asgiref.sync import async_to_sync
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from structlog.testing import capture_logs

from controlplane.billing.ledger import ledger_append
from controlplane.billing.meters import compression_to_ledger, royalty_to_ledger, training_to_ledger
from controlplane.billing.models import Meter, PriceBookEntry
from controlplane.billing.prices import price_set
from controlplane.core import redis_clients
from controlplane.core.redis_clients import sync_client
from controlplane.inference.usage import usage_record
from controlplane.limits import budgets
from controlplane.limits.budgets import BudgetSpec, areserve, asettle, budget_state
from controlplane.limits.models import Budget
from controlplane.serving import admission, gateway
from jobcontracts.inference import ModelRef, Params
from tests.support.budgets import monthly_budget, reserve, settle
from tests.support.people import Person
from tests.support.processes import free_port
from tests.support.serving import isolated
from tests.support.usage import usage_report

pytestmark = pytest.mark.django_db

D = Decimal


def _state(budget: Budget) -> tuple[Decimal, Decimal]:
    state = budget_state(BudgetSpec.of(budget))
    return state.spent, state.reserved


@pytest.fixture(autouse=True)
def _no_deferred_settles() -> Iterator[None]:
    budgets._deferred.clear()
    yield
    budgets._deferred.clear()


@contextmanager
def _limits_redis_unreachable(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The limits' Redis client of every event loop is a real client pointed at a closed
    port (no retries: fast)."""
    port = free_port()

    def unreachable() -> tuple[redis.asyncio.Redis, dict[str, Any]]:
        retry = AsyncRetry(NoBackoff(), 0)
        return redis.asyncio.Redis(port=port, socket_connect_timeout=0.5, retry=retry), {}

    with monkeypatch.context() as patch:
        patch.setattr(redis_clients, "async_client", unreachable)
        yield


# --- a settle Redis refused -------------------------------------------------------------


def test_a_settle_redis_refuses_is_applied_by_the_next_reserve_and_the_counter_converges(
    alice: Person, monkeypatch: pytest.MonkeyPatch
) -> None:
    budget = monthly_budget(alice, "10")
    held = reserve(organization_id=alice.organization.pk, api_key_id=None, max_cost=D("1"))
    with _limits_redis_unreachable(monkeypatch), capture_logs() as logs:
        settle(held, D("0.40"))  # kept, not raised, not lost
    (warning,) = [e for e in logs if e["event"] == "limits.budget_settle_deferred"]
    assert warning["log_level"] == "warning"
    assert (warning["reservation_id"], warning["cost"]) == (held.id, "0.40")
    assert _state(budget) == (D("0"), D("1"))  # meanwhile the hold still counts

    later = reserve(organization_id=alice.organization.pk, api_key_id=None, max_cost=D("0.10"))
    assert _state(budget) == (D("0.40"), D("0.10"))
    settle(later, D("0.10"))
    settle(held, D("0.40"))  # the caller retrying on its own counts nothing twice
    assert _state(budget) == (D("0.50"), D("0"))


def test_an_asyncio_settle_redis_refuses_is_not_lost(alice: Person) -> None:
    budget = monthly_budget(alice, "10")
    org = alice.organization.pk
    settle(reserve(organization_id=org, api_key_id=None, max_cost=D("0.01")), D(0))  # no thread

    async def run() -> None:
        held = await areserve(organization_id=org, api_key_id=None, max_cost=D("1"))
        loop = asyncio.get_running_loop()
        real = redis_clients._async[loop]
        bad = redis.asyncio.Redis(
            port=free_port(), socket_connect_timeout=0.5, retry=AsyncRetry(NoBackoff(), 0)
        )
        redis_clients._async[loop] = (bad, {})
        try:
            await asettle(held, D("0.25"))
        finally:
            redis_clients._async[loop] = real
            await bad.aclose()
        assert _state(budget) == (D("0"), D("1"))
        later = await areserve(organization_id=org, api_key_id=None, max_cost=D("0.01"))
        await asettle(later, D(0))  # the process's next reserve applied the deferred settle

    asyncio.run(run())
    assert _state(budget) == (D("0.25"), D("0"))


def test_a_deferred_settle_waits_longer_each_time_redis_still_refuses(
    alice: Person, monkeypatch: pytest.MonkeyPatch
) -> None:
    budget = monthly_budget(alice, "10")
    held = reserve(organization_id=alice.organization.pk, api_key_id=None, max_cost=D("1"))
    with _limits_redis_unreachable(monkeypatch):
        settle(held, D("0.40"))
        async_to_sync(budgets._retry_deferred)()  # tried at once: still down
    (item,) = budgets._deferred
    assert item.next_try > time.monotonic()  # not retried on every call while Redis is down
    async_to_sync(budgets._retry_deferred)()  # not due yet
    assert _state(budget) == (D("0"), D("1"))
    item.next_try = 0.0
    async_to_sync(budgets._retry_deferred)()
    assert _state(budget) == (D("0.40"), D("0"))
    assert not budgets._deferred


def test_a_zero_cost_hold_settles_and_an_expired_one_is_released(
    alice: Person, settings: Any
) -> None:
    budget = monthly_budget(alice, "10")
    org = alice.organization.pk
    # A model without a price holds $0: giving back "-0" was refused by Redis.
    settle(reserve(organization_id=org, api_key_id=None, max_cost=D(0)), D(0))
    settings.LIMITS_RESERVATION_TTL_SECONDS = 0.05
    reserve(organization_id=org, api_key_id=None, max_cost=D(0))  # never settled
    time.sleep(0.1)
    reserve(organization_id=org, api_key_id=None, max_cost=D("0.10"))  # expires the $0 hold
    assert _state(budget) == (D(0), D("0.10"))


def test_a_deferred_settle_of_a_long_closed_period_is_abandoned_not_kept_forever(
    alice: Person, monkeypatch: pytest.MonkeyPatch
) -> None:
    monthly_budget(alice, "10")
    at = datetime.now(UTC) - timedelta(days=70)  # a period that ended over a day ago
    held = reserve(organization_id=alice.organization.pk, api_key_id=None, max_cost=D(1), at=at)
    with _limits_redis_unreachable(monkeypatch):
        settle(held, D("0.40"))
    assert len(budgets._deferred) == 1
    with capture_logs() as logs:
        async_to_sync(budgets._retry_deferred)()
    assert not budgets._deferred
    assert [e["event"] for e in logs] == ["limits.budget_settle_abandoned"]


# --- what a budget counts: the live counter and the rebuild agree ----------------------


def _infer(person: Person, kind: str, key: str, prompt: int, completion: int) -> None:
    """One inference request as the gateway runs it: admitted, settled at the worker's
    reported usage, and that usage stored (ledgered) as the usage stream's consumer does."""
    model = ModelRef(
        id="test-base",
        base_name="test-base",
        base_uri="file:///nonexistent/test-base",
        family="llama",
        task="causal_lm",
        context_length=256,
    )
    texts = {"messages": [{"role": "user", "content": "hello"}]} if kind == "chat" else {}
    request = gateway.build(
        rid=gateway.request_id(kind),
        organization_id=person.organization.pk,
        api_key_id=key,
        kind=kind,
        model=model,
        params=Params(max_tokens=16),
        inputs=[] if kind == "chat" else ["hello"],
        timeout=5.0,
        **texts,  # type: ignore[arg-type]
    )
    used = {"prompt_tokens": prompt, "completion_tokens": completion}

    async def admit_and_settle() -> None:
        await admission.asettle(await admission.aadmit(request, person.organization), used)

    async_to_sync(isolated)(admit_and_settle())
    stored = usage_record(
        usage_report(
            request_id=request.request_id,
            organization_id=person.organization.pk,
            api_key_id=key,
            model="test-base",
            kind=kind,
            prompt_tokens=prompt,
            completion_tokens=completion,
        ).to_json()
    )
    assert stored == "applied"


@pytest.mark.django_db(transaction=True)  # admission reads prices and budgets in a thread
def test_a_rebuild_after_spend_of_every_kind_equals_the_live_counter(
    alice: Person, charlie: Person, free_plan: object
) -> None:
    PriceBookEntry.objects.all().delete()
    since = datetime.now(UTC) - timedelta(days=400)
    for meter, price in [
        (Meter.PROMPT_TOKENS, "1"),
        (Meter.COMPLETION_TOKENS, "10"),
        (Meter.TRAINING_TOKENS, "800"),
        (Meter.COMPRESSION_JOB, "5"),
        (Meter.STORAGE_MB_DAY, "2"),
    ]:
        price_set(meter=meter, unit_price=D(price), effective_from=since)
    admission.prices_cache_clear()
    key = alice.membership.api_keys.get().pk
    org_budget, key_budget = monthly_budget(alice, "100"), monthly_budget(alice, "100", key=key)

    # Inference of every kind, live: reserved, settled, ledgered from the worker's report.
    _infer(alice, "chat", key, 120, 40)
    _infer(alice, "completion", key, 30, 16)
    _infer(alice, "embedding", key, 500, 0)
    # Spend that is not inference, and an earning: on the ledger, not in a budget.
    now = datetime.now(UTC)
    training_to_ledger(
        organization_id=alice.organization.pk,
        job_id="ftjob-1",
        base_model="test-base",
        trained_tokens=250_000,
        at=now,
    )
    compression_to_ledger(
        organization_id=alice.organization.pk, job_id="cmpjob-1", model="test-base", at=now
    )
    ledger_append(
        organization_id=alice.organization.pk,
        idempotency_key="storage:test",
        meter=Meter.STORAGE_MB_DAY,
        quantity=3_000_000,
        occurred_at=now,
        source="billing.storage",
    )
    royalty_to_ledger(
        partner_id=alice.organization.pk,
        listing_id="listing-1",
        job_id="ftjob-2",
        customer_id=charlie.organization.pk,
        trained_tokens=9_000,
        price_per_1k_tokens=D("1"),
        at=now,
    )
    inference = D(650) * D("0.000001") + D(56) * D("0.00001")
    live = _state(org_budget), _state(key_budget)
    assert live == ((inference, D(0)), (inference, D(0)))

    client = sync_client()
    client.delete(*client.scan_iter(match=f"{budgets.key('bud')}*"))  # Redis lost it all
    reserve(organization_id=alice.organization.pk, api_key_id=key, max_cost=D(0))  # rebuilds
    spec = BudgetSpec.of(org_budget)
    assert client.exists(budgets.Held(spec, *budgets.spec_bounds(spec, now)).hash_key)
    assert (_state(org_budget), _state(key_budget)) == live
