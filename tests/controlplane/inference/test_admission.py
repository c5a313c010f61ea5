"""Billing on the inference path: suspension, plan caps, rate limits and budgets.

Each refusal comes before anything reaches a worker. Admitted requests here find
no worker and end as a quick 503 (`x-atelier-timeout`), which shows they passed.
The in-process tests go through the serving router (`tests.support.serving`, with
committed rows: admission reads them in its own threads); the real-server tests through
`atelier web`, including two web processes sharing one rate limit.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from django.conf import settings
from django.utils import timezone

from controlplane.accounts.models import APIKey
from controlplane.billing.models import Meter
from controlplane.billing.plans import plan_cache_clear
from controlplane.billing.prices import price_set
from controlplane.limits.budgets import budgets_cache_clear
from controlplane.limits.resolve import limits_cache_clear
from controlplane.payments import access
from controlplane.serving import admission
from jobcontracts import queues
from jobcontracts.inference import request_queue
from tests.support.budgets import monthly_budget, reserve, settle
from tests.support.people import Person
from tests.support.plans import set_plan
from tests.support.processes import asgi_server
from tests.support.registry import base_model
from tests.support.serving import serve

CHAT = "/v1/chat/completions"
QUICK = {"x-atelier-timeout": "0.3"}


def body(**extra: Any) -> dict[str, Any]:
    return {"model": "test-base", "messages": [{"role": "user", "content": "hi"}], **extra}


@pytest.fixture(autouse=True)
def _fresh(db: None) -> Iterator[None]:
    base_model("test-base", tasks=["causal_lm"], context_length=4096)
    for clear in (limits_cache_clear, budgets_cache_clear, plan_cache_clear):
        clear()
    access.standing_cache_clear()
    admission.prices_cache_clear()
    yield
    redis.Redis.from_url(settings.REDIS_URL).delete(request_queue(queues.GPU_INFERENCE))
    access.standing_cache_clear()


def call(person: Person, **extra: Any) -> Any:
    return serve(CHAT, body(**extra), key=person.key, headers=QUICK)


def error(response: Any) -> tuple[int, str]:
    return response.status_code, response.json()["error"]["code"]


def limit_key(person: Person, **limits: int | None) -> None:
    key_id = APIKey.objects.for_organization(person.organization).values_list("pk", flat=True)[0]
    fields = {"requests_per_minute": None, "tokens_per_minute": None, "requests_per_day": None}
    response = person.client.put(
        f"/v1/organization/api_keys/{key_id}/limits", {**fields, **limits}, format="json"
    )
    assert response.status_code == 200, response.content


def suspend(person: Person) -> None:
    access.dunning_start(
        organization=person.organization,
        invoice={"id": "in_unpaid", "amount_due": 2900, "currency": "usd"},
        at=timezone.now() - timedelta(days=settings.PAYMENTS_DUNNING_GRACE_DAYS + 1),
    )
    access.standing_cache_clear()


@pytest.mark.django_db(transaction=True)
def test_an_admitted_request_carries_its_rate_limit_headers_and_the_third_is_429(
    alice: Person,
) -> None:
    limit_key(alice, requests_per_minute=2)
    first, second = call(alice), call(alice)
    assert error(first) == (503, "no_capacity")  # admitted, then no worker
    assert first.headers["x-ratelimit-limit-requests"] == "2"
    assert (
        first.headers["x-ratelimit-remaining-requests"],
        second.headers["x-ratelimit-remaining-requests"],
    ) == (
        "1",
        "0",
    )
    third = call(alice)
    assert error(third) == (429, "rate_limit_exceeded")
    assert "requests/min" in third.json()["error"]["message"]
    assert third.headers["x-ratelimit-remaining-requests"] == "0"
    assert int(third.headers["Retry-After"]) >= 1
    assert redis.Redis.from_url(settings.REDIS_URL).llen(request_queue(queues.GPU_INFERENCE)) <= 2


@pytest.mark.django_db(transaction=True)
def test_tokens_per_minute_count_the_prompt_estimate_and_every_token_it_may_produce(
    alice: Person,
) -> None:
    limit_key(alice, tokens_per_minute=500)
    too_big = call(alice, max_tokens=200, n=3)  # 600 completion tokens at most
    assert error(too_big) == (429, "rate_limit_exceeded")
    assert error(call(alice, max_tokens=100)) == (503, "no_capacity")


@pytest.mark.django_db(transaction=True)
def test_a_hard_budget_refuses_with_insufficient_quota_not_rate_limit_exceeded(
    alice: Person,
) -> None:
    price_set(
        meter=Meter.COMPLETION_TOKENS,
        unit_price=Decimal("100"),  # $100 per 1M tokens: 1,000 tokens = $0.10
        effective_from=timezone.now() - timedelta(days=1),
        model="test-base",
    )
    monthly_budget(alice, "0.05", kind="hard", name="tight")
    # Admitted while the budget has room (its hold is given back: nothing ran) ...
    assert error(call(alice, max_tokens=1000)) == (503, "no_capacity")
    # ... then earlier requests spend it ($0.05, settled by the gateway as they end).
    held = reserve(organization_id=alice.organization.pk, api_key_id=None, max_cost=Decimal("0.05"))
    settle(held, Decimal("0.05"))
    refused = call(alice, max_tokens=10)
    assert error(refused) == (429, "insufficient_quota")
    assert "tight" in refused.json()["error"]["message"]


@pytest.mark.django_db(transaction=True)
def test_plan_caps_on_max_tokens_and_n_are_400s_naming_the_field(alice: Person) -> None:
    set_plan(alice.organization.plan, max_tokens_cap=64, max_n=2)
    refused = call(alice, max_tokens=65)
    assert error(refused) == (400, "plan_limit_exceeded")
    assert refused.json()["error"]["param"] == "max_tokens"
    assert call(alice, n=3, max_tokens=10).json()["error"]["param"] == "n"
    assert error(call(alice, max_tokens=64, n=2)) == (503, "no_capacity")


@pytest.mark.django_db(transaction=True)
def test_an_organization_suspended_for_an_unpaid_invoice_gets_402_and_others_are_served(
    alice: Person, charlie: Person
) -> None:
    suspend(alice)
    refused = call(alice)
    assert error(refused) == (402, "billing_suspended")
    assert "in_unpaid" in refused.json()["error"]["message"]
    assert error(call(charlie)) == (503, "no_capacity")


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_the_asyncio_front_door_enforces_the_same_and_two_web_processes_share_one_limit(
    tmp_path: Path, alice: Person, charlie: Person
) -> None:
    limit_key(alice, requests_per_minute=3)
    suspend(charlie)
    with (
        asgi_server(tmp_path / "a") as one,
        asgi_server(tmp_path / "b") as two,
    ):
        answers = []
        for i in range(8):
            server = (one, two)[i % 2]
            response = httpx.post(
                server.url + CHAT,
                headers={"Authorization": f"Bearer {alice.key}", **QUICK},
                json=body(),
                timeout=10,
            )
            answers.append(response)
        codes = [r.json()["error"]["code"] for r in answers]
        assert codes.count("no_capacity") == 3, codes  # not 3 per process
        assert codes.count("rate_limit_exceeded") == 5, codes
        assert answers[0].headers["x-ratelimit-limit-requests"] == "3"
        refused = next(r for r in answers if r.status_code == 429)
        assert refused.headers["x-ratelimit-remaining-requests"] == "0"
        assert int(refused.headers["retry-after"]) >= 1

        suspended = httpx.post(
            one.url + CHAT,
            headers={"Authorization": f"Bearer {charlie.key}", **QUICK},
            json=body(),
            timeout=10,
        )
        assert (suspended.status_code, suspended.json()["error"]["code"]) == (
            402,
            "billing_suspended",
        )
