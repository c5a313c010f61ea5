"""A request's budget hold is settled at what its worker reported, and released on every
exit after admission (a reply channel or queue that fails). Through the serving router,
in-process, with committed rows (admission reads them in its own threads).

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
from controlplane.core import redis_clients
from controlplane.core.serializers import validated_reusing
from controlplane.limits import budgets
from controlplane.limits.budgets import BudgetSpec, budget_state, budgets_cache_clear
from controlplane.limits.models import Budget
from controlplane.limits.resolve import limits_cache_clear
from controlplane.serving import admission, endpoints, gateway, inputs, replies
from jobcontracts import queues
from jobcontracts.inference import InferenceRequest, Reply, cancel_key, reply_channel, request_queue
from tests.support.budgets import monthly_budget, reserve, settle
from tests.support.people import Person
from tests.support.processes import free_port
from tests.support.registry import base_model
from tests.support.serving import isolated, serve

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
    admission.prices_cache_clear()
    budgets._deferred.clear()
    queue = redis.Redis.from_url(settings.REDIS_URL)
    queue.delete(request_queue(queues.GPU_INFERENCE))
    yield
    queue.delete(request_queue(queues.GPU_INFERENCE))
    budgets._deferred.clear()


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
    inference = endpoints.ChatCompletions.prepare(
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


# --- through the serving router -----------------------------------------------------------


async def _stream_then_leave(person: Person, body: dict[str, Any]) -> list[bytes]:
    """POST `body` to the ASGI application as a server would, and hang up once the
    stream's first token ("Hel") has been sent."""
    from controlplane.asgi import application

    sent: list[bytes] = []
    token = asyncio.Event()
    requested = False

    async def receive() -> dict[str, Any]:
        nonlocal requested
        if not requested:
            requested = True
            return {"type": "http.request", "body": orjson.dumps(body), "more_body": False}
        await token.wait()
        return {"type": "http.disconnect"}

    async def send(message: Any) -> None:
        if message["type"] == "http.response.body":
            sent.append(message.get("body", b""))
            if b"Hel" in message.get("body", b""):
                token.set()

    headers = [
        (b"host", b"testserver"),
        (b"content-type", b"application/json"),
        (b"authorization", f"Bearer {person.key}".encode()),
    ]
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": CHAT,
        "raw_path": CHAT.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 50000),
        "server": ("testserver", 80),
    }
    await application(scope, receive, send)
    return sent


@pytest.mark.django_db(transaction=True)
def test_a_stream_the_client_leaves_is_settled_at_the_usage_its_worker_reports(
    alice: Person,
) -> None:
    budget = _budget(alice)
    worker = _Worker({"prompt_tokens": 7, "completion_tokens": 2})
    worker.start()
    body = {
        "model": "test-base",
        "messages": [{"role": "user", "content": "hi"}],
        "stream": True,
        "max_tokens": 500,
    }
    events = async_to_sync(isolated)(_stream_then_leave(alice, body))
    worker.join(5)
    assert any(b"Hel" in event for event in events)
    assert b"data: [DONE]" not in b"".join(events)  # it left before the end
    assert _state(budget) == (7 * PROMPT + 2 * COMPLETION, D(0))


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("stream", [False, True])
def test_a_request_whose_reply_subscription_fails_is_a_503_and_its_hold_released(
    alice: Person, monkeypatch: pytest.MonkeyPatch, stream: bool
) -> None:
    budget = _budget(alice)

    async def down(self: replies.Subscription) -> replies.Subscription:
        raise redis.ConnectionError("injected: the reply channel is down")

    monkeypatch.setattr(replies.Subscription, "aopen", down)
    body = {"model": "test-base", "messages": [{"role": "user", "content": "hi"}]}
    response = serve(CHAT, {**body, "stream": stream}, key=alice.key)
    assert response.status_code == 503, response.text  # before the stream's 200
    error = response.json()["error"]
    assert (error["type"], error["code"], error["param"]) == (
        "server_error",
        "service_unavailable",
        None,
    )
    assert response.headers["retry-after"] == "1"
    assert _state(budget) == (D(0), D(0))  # nothing ran: not charged the estimate
    assert redis.Redis.from_url(settings.REDIS_URL).llen(request_queue(queues.GPU_INFERENCE)) == 0


@pytest.mark.django_db(transaction=True)
def test_a_settle_redis_refuses_is_counted_once_redis_is_back(alice: Person) -> None:
    budget = _budget(alice)
    inference, _ = _chat(alice, max_tokens=100)

    async def settle_while_redis_is_unreachable() -> None:
        admitted = await admission.aadmit(inference, alice.organization)
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

    async_to_sync(isolated)(settle_while_redis_is_unreachable())
    spent, reserved = _state(budget)
    assert spent == 0  # not lost: deferred, and meanwhile the hold still counts
    assert reserved > 0
    later = reserve(organization_id=alice.organization.pk, api_key_id=None, max_cost=D(1))
    settle(later, D(0))  # the process's next reserve applied the deferred settle
    assert _state(budget) == (5 * PROMPT, D(0))
