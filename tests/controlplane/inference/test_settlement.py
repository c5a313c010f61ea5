"""A request's budget hold is settled at what its worker reported, by both front doors,
and released on every exit after admission (a reply channel or queue that fails).

The worker here is a thread speaking the real Redis protocol (request list, reply
channel, cancel key); failures of the reply subscription are injected at its seam.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from decimal import Decimal
from typing import Any

import httpx
import orjson
import pytest
import redis
import redis.asyncio
from asgiref.sync import async_to_sync
from django.conf import settings
from django.utils import timezone
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from controlplane.billing.models import Meter, PriceBookEntry
from controlplane.billing.prices import price_set
from controlplane.core.serializers import validated_reusing
from controlplane.inference import admission, apis, fastpath, gateway, inputs, replies
from controlplane.limits import budgets, redis_clients
from controlplane.limits.budgets import BudgetSpec, budget_state, budgets_cache_clear
from controlplane.limits.models import Budget
from controlplane.limits.resolve import limits_cache_clear
from jobcontracts import queues
from jobcontracts.inference import InferenceRequest, Reply, cancel_key, reply_channel, request_queue
from tests.support.budgets import monthly_budget
from tests.support.people import Person
from tests.support.processes import free_port
from tests.support.registry import base_model

CHAT = "/v1/chat/completions"
D = Decimal
#: $1 per 1M prompt tokens, $10 per 1M completion tokens.
PROMPT, COMPLETION = D("0.000001"), D("0.00001")


@pytest.fixture(autouse=True)
def _fresh(db: None) -> Iterator[None]:
    base_model("test-base", tasks=["causal_lm"], context_length=4096)
    PriceBookEntry.objects.all().delete()
    since = timezone.now() - timedelta(days=1)
    price_set(meter=Meter.PROMPT_TOKENS, unit_price=D(1), effective_from=since)
    price_set(meter=Meter.COMPLETION_TOKENS, unit_price=D(10), effective_from=since)
    limits_cache_clear()
    budgets_cache_clear()
    admission._prices.clear()
    budgets._deferred.clear()
    _forget_event_loops()
    queue = redis.Redis.from_url(settings.REDIS_URL)
    queue.delete(request_queue(queues.GPU_INFERENCE))
    yield
    queue.delete(request_queue(queues.GPU_INFERENCE))
    budgets._deferred.clear()
    _forget_event_loops()


def _forget_event_loops() -> None:
    # Clients and hubs keyed by id(loop): a later asyncio.run may reuse a dead loop's id.
    replies._async_clients.clear()
    replies._hubs.clear()


def _budget(person: Person) -> Budget:
    budget = monthly_budget(person, "100")
    # Read here, once: the asyncio code then needs no database thread.
    budgets.budgets_for(organization_id=person.organization.pk, api_key_id=None)
    return budget


def _state(budget: Budget) -> tuple[Decimal, Decimal]:
    state = budget_state(BudgetSpec.of(budget))
    return state.spent, state.reserved


def _chat(person: Person, **extra: Any) -> tuple[InferenceRequest, dict[str, Any]]:
    data = validated_reusing(
        inputs.ChatInput,
        {"model": "test-base", "messages": [{"role": "user", "content": "hi"}], **extra},
    )
    model = gateway.model_ref(organization=person.organization, model_id="test-base", kind="chat")
    inference = apis.ChatCompletionsApi.prepare(
        data,
        organization_id=person.organization.pk,
        api_key_id=person.membership.api_keys.get().pk,
        model=model,
        timeout=5.0,
    )
    return inference, data


class _Worker(threading.Thread):
    """Takes one request, streams a token, and on its cancel key ends as a real worker
    does: a `done` reply with the tokens it produced."""

    def __init__(self, usage: dict[str, int]) -> None:
        super().__init__(daemon=True)
        self.usage = usage

    def run(self) -> None:
        client = redis.Redis.from_url(settings.REDIS_URL)
        taken = client.brpop([request_queue(queues.GPU_INFERENCE)], timeout=5)
        assert taken is not None
        request = InferenceRequest.from_json(orjson.loads(taken[1]))
        channel = reply_channel(request.request_id, request.reply_to)

        def reply(kind: str, data: dict[str, Any]) -> None:
            message = Reply(kind, request.request_id, data).to_json()
            client.publish(channel, orjson.dumps(message))

        reply("start", {"queue_ms": 0.1, "load_ms": 0.0})
        reply("delta", {"index": 0, "text": "Hel"})
        deadline = time.monotonic() + 5
        while not client.exists(cancel_key(request.request_id)):
            assert time.monotonic() < deadline, "never cancelled"
            time.sleep(0.01)
        choice = {"index": 0, "text": "Hel", "finish_reason": "cancelled"}
        reply("done", {"choices": [choice], "usage": {**self.usage, "total_tokens": 9}})
        client.close()


# --- the DRF views (the test client) ----------------------------------------------------


@pytest.mark.django_db
def test_a_drf_stream_the_client_leaves_is_settled_at_the_usage_its_worker_reports(
    alice: Person,
) -> None:
    budget = _budget(alice)
    inference, data = _chat(alice, stream=True, max_tokens=500)
    admitted = admission.admit(inference)
    assert _state(budget)[1] > 0  # held at its maximum: 500 completion tokens
    worker = _Worker({"prompt_tokens": 7, "completion_tokens": 2})
    worker.start()

    async def read_a_token_then_leave() -> list[bytes]:
        stream = apis._sse(
            inference, 5.0, apis.ChatCompletionsApi.chunks(inference, data), admitted
        )
        events = [await anext(stream), await anext(stream)]  # the role, then "Hel"
        await stream.aclose()  # the client hung up (what the ASGI server does)
        return events

    events = asyncio.run(read_a_token_then_leave())
    worker.join(5)
    assert b"Hel" in events[1]
    assert _state(budget) == (7 * PROMPT + 2 * COMPLETION, D(0))


@pytest.mark.django_db
def test_a_drf_request_whose_reply_channel_fails_is_a_503_and_its_hold_released(
    alice: Person, monkeypatch: pytest.MonkeyPatch
) -> None:
    budget = _budget(alice)

    def down(self: replies.Subscription) -> replies.Subscription:
        raise redis.ConnectionError("injected: the reply channel is down")

    monkeypatch.setattr(replies.Subscription, "open", down)
    body = {"model": "test-base", "messages": [{"role": "user", "content": "hi"}]}
    response = alice.client.post(CHAT, body, format="json")
    assert response.status_code == 503
    error = response.json()["error"]
    assert (error["type"], error["code"], error["param"]) == (
        "server_error",
        "service_unavailable",
        None,
    )
    assert response["Retry-After"] == "1"
    assert _state(budget) == (D(0), D(0))


@pytest.mark.django_db
def test_a_drf_stream_whose_reply_channel_fails_releases_its_hold_and_says_so(
    alice: Person, monkeypatch: pytest.MonkeyPatch
) -> None:
    budget = _budget(alice)

    async def down(self: replies.Subscription) -> replies.Subscription:
        raise redis.ConnectionError("injected: the reply channel is down")

    monkeypatch.setattr(replies.Subscription, "aopen", down)
    body = {"model": "test-base", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    response = alice.client.post(CHAT, body, format="json")

    async def read() -> bytes:
        return b"".join([part async for part in response.streaming_content])

    assert response.status_code == 200  # sent before the stream runs: the error is an event
    events = asyncio.run(read()).split(b"\n\n")
    assert orjson.loads(events[0].removeprefix(b"data: "))["error"]["code"] == (
        "service_unavailable"
    )
    assert events[1] == b"data: [DONE]"
    assert _state(budget) == (D(0), D(0))  # nothing ran: not charged the estimate


# --- the asyncio front door --------------------------------------------------------------


async def _post_to_fast_path(person: Person, body: dict[str, Any]) -> httpx.Response:
    async def django(scope: Any, receive: Any, send: Any) -> None:
        raise AssertionError("the inference POST went past the fast path")

    transport = httpx.ASGITransport(app=fastpath.InferenceRouter(django))
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        response = await client.post(
            CHAT, json=body, headers={"Authorization": f"Bearer {person.key}"}
        )
    while fastpath._tasks:  # the settle runs after the response
        await asyncio.sleep(0.01)
    return response


@pytest.mark.django_db
def test_the_fast_path_releases_the_hold_when_the_reply_subscription_fails(
    alice: Person, monkeypatch: pytest.MonkeyPatch
) -> None:
    budget = _budget(alice)
    # The caches the fast path reads without a query (standing, plan, limits, prices),
    # filled here; its thread-sensitive lookups then run on this thread (async_to_sync).
    admission.settle(admission.admit(_chat(alice)[0]), None)

    async def down(self: replies.HubSubscription) -> replies.HubSubscription:
        raise redis.ConnectionError("injected: the reply channel is down")

    monkeypatch.setattr(replies.HubSubscription, "aopen", down)
    body = {"model": "test-base", "messages": [{"role": "user", "content": "hi"}]}
    response = async_to_sync(_post_to_fast_path)(alice, body)
    assert response.status_code == 503, response.text
    assert response.json()["error"]["code"] == "service_unavailable"
    assert response.json()["error"]["type"] == "server_error"
    assert response.headers["retry-after"] == "1"
    assert _state(budget) == (D(0), D(0))
    assert redis.Redis.from_url(settings.REDIS_URL).llen(request_queue(queues.GPU_INFERENCE)) == 0


@pytest.mark.django_db
def test_a_fast_path_settle_redis_refuses_is_counted_once_redis_is_back(alice: Person) -> None:
    budget = _budget(alice)
    inference, _ = _chat(alice, max_tokens=100)
    admitted = admission.admit(inference)

    async def settle_while_redis_is_unreachable() -> None:
        loop = asyncio.get_running_loop()
        bad = redis.asyncio.Redis(
            port=free_port(), socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0)
        )
        redis_clients._async[loop] = (bad, {})
        try:  # what the fast path settles with, after the response
            await admission.asettle(admitted, {"prompt_tokens": 5, "completion_tokens": 0})
        finally:
            del redis_clients._async[loop]
            await bad.aclose()

    asyncio.run(settle_while_redis_is_unreachable())
    spent, reserved = _state(budget)
    assert spent == 0  # not lost: deferred, and meanwhile the hold still counts
    assert reserved > 0
    later = budgets.reserve(organization_id=alice.organization.pk, api_key_id=None, max_cost=D(1))
    budgets.settle(later, D(0))  # the process's next reserve applied the deferred settle
    assert _state(budget) == (5 * PROMPT, D(0))
