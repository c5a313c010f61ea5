"""The usage stream (real Redis, real PostgreSQL): each report stored and billed once.

A control worker reads reports in a consumer group and acknowledges them only after
its transaction commits. These tests play the failures: the same report on the
stream three times, and a consumer that dies between its commit and its
acknowledgement (its entries stay pending until another consumer claims them).
"""

from __future__ import annotations

import time
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

import orjson
import pytest
import redis
from django.conf import settings

from controlplane.billing.credits import credit_balance, credit_grant
from controlplane.billing.invoicing import invoice_run
from controlplane.billing.models import Invoice, LedgerEntry, Meter
from controlplane.inference import usage
from controlplane.inference.models import UsageRecord
from controlplane.inference.usage_stream import UsageStreamConsumer, ensure_group
from controlplane.tenancy.models import Organization
from jobcontracts.inference import USAGE_GROUP, USAGE_STREAM
from tests.controlplane.billing.factories import price
from tests.support.people import Person
from tests.support.plans import set_plan

pytestmark = pytest.mark.django_db


@pytest.fixture
def stream() -> Any:
    client = redis.Redis.from_url(settings.REDIS_URL)
    client.delete(USAGE_STREAM)
    ensure_group(client)
    yield client
    client.delete(USAGE_STREAM)


def report(person: Person, request_id: str, *, completion: int = 10, at: float = 0) -> bytes:
    return orjson.dumps(
        {
            "request_id": request_id,
            "organization_id": person.organization.pk,
            "api_key_id": None,
            "model": "atelier-tiny-llama",
            "kind": "chat",
            "prompt_tokens": 5,
            "completion_tokens": completion,
            "status": "completed",
            "latency_ms": 12.5,
            "at": at or time.time(),
        }
    )


def stored(person: Person) -> list[tuple[str, int]]:
    rows = UsageRecord.objects.for_organization(person.organization).order_by("request_id")
    return [(r.request_id, r.completion_tokens) for r in rows]


def ledgered(person: Person) -> int:
    return LedgerEntry.objects.for_organization(person.organization).count()


def test_the_same_report_three_times_on_the_stream_is_stored_and_billed_once(
    stream: Any, alice: Person
) -> None:
    for _ in range(3):
        stream.xadd(USAGE_STREAM, {"report": report(alice, "req-thrice")})
    consumer = UsageStreamConsumer(name="control-1", block_ms=10)
    assert consumer.drain() == 3
    assert stored(alice) == [("req-thrice", 10)]
    assert ledgered(alice) == 2  # prompt and completion tokens, once each
    assert stream.xlen(USAGE_STREAM) == 0  # acknowledged and deleted


def test_a_consumer_killed_between_commit_and_ack_is_claimed_and_nothing_is_stored_twice(
    stream: Any, alice: Person
) -> None:
    for i in range(3):
        stream.xadd(USAGE_STREAM, {"report": report(alice, f"req-{i}")})
    # Consumer "a" reads the batch and commits it, then dies before XACK.
    [(_, entries)] = stream.xreadgroup(USAGE_GROUP, "a", {USAGE_STREAM: ">"}, count=10)
    usage.usage_record_many([orjson.loads(fields[b"report"]) for _, fields in entries])
    assert stream.xpending(USAGE_STREAM, USAGE_GROUP)["pending"] == 3
    # A report that arrives meanwhile.
    stream.xadd(USAGE_STREAM, {"report": report(alice, "req-3")})

    time.sleep(0.06)
    survivor = UsageStreamConsumer(name="b", block_ms=10, claim_idle_ms=50)
    assert survivor.drain() == 4  # the dead consumer's 3, claimed, and the new one

    assert stored(alice) == [("req-0", 10), ("req-1", 10), ("req-2", 10), ("req-3", 10)]
    assert ledgered(alice) == 8
    assert stream.xpending(USAGE_STREAM, USAGE_GROUP)["pending"] == 0
    assert stream.xlen(USAGE_STREAM) == 0


def test_a_consumer_killed_before_its_commit_leaves_the_reports_to_be_stored_once(
    stream: Any, alice: Person
) -> None:
    stream.xadd(USAGE_STREAM, {"report": report(alice, "req-lost-commit")})
    stream.xreadgroup(USAGE_GROUP, "a", {USAGE_STREAM: ">"}, count=10)  # read, then died
    assert stored(alice) == []
    time.sleep(0.06)
    assert UsageStreamConsumer(name="b", block_ms=10, claim_idle_ms=50).drain() == 1
    assert stored(alice) == [("req-lost-commit", 10)]


def test_credits_that_run_out_mid_request_cover_what_they_can_and_the_rest_is_invoiced(
    stream: Any, alice: Person
) -> None:
    """Prepaid credit does not stop a request that is running: the request's whole
    usage is recorded, the credit covers what it can, and the rest is invoiced."""
    since = datetime(2024, 1, 1, tzinfo=UTC)
    price(Meter.PROMPT_TOKENS, "1.00", since)
    price(Meter.COMPLETION_TOKENS, "2.00", since)
    set_plan("free", monthly_price=Decimal(0), included_amount=Decimal(0))
    Organization.objects.filter(pk=alice.organization.pk).update(
        created_at=datetime(2025, 1, 1, tzinfo=UTC)
    )
    credit_grant(
        organization=alice.organization, amount=Decimal("1.50"), source="staff", idempotency_key="g"
    )
    # One request that costs $2.000005 (rounded to $2.00 on the invoice) with $1.50 left.
    at = datetime(2026, 1, 10, tzinfo=UTC).timestamp()
    stream.xadd(USAGE_STREAM, {"report": report(alice, "req-big", completion=1_000_000, at=at)})
    UsageStreamConsumer(name="c", block_ms=10).drain()

    invoice_run(period=date(2026, 1, 1))
    (invoice,) = Invoice.objects.for_organization(alice.organization)
    assert (invoice.subtotal, invoice.credits_applied, invoice.total) == (
        Decimal("2.00"),
        Decimal("1.50"),
        Decimal("0.50"),
    )
    assert credit_balance(alice.organization) == Decimal("0.00")
