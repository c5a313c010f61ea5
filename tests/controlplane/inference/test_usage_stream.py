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


# --- poison reports: parked in the dead-letter stream, never holding back the rest ---------


DEAD_STREAM = f"{USAGE_STREAM}:dead"


@pytest.fixture
def dead(stream: Any) -> Any:
    stream.delete(DEAD_STREAM)
    yield stream
    stream.delete(DEAD_STREAM)


def dead_lettered(reason: str) -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value("atelier_usage_dead_letter_total", {"reason": reason}) or 0.0


def parked(client: Any) -> dict[str, dict[str, str]]:
    """The dead-letter stream, by the id each entry had on the usage stream."""
    letters = {}
    for _, fields in client.xrange(DEAD_STREAM):
        text = {k.decode(): v.decode() for k, v in fields.items()}
        letters[text["entry_id"]] = text
    return letters


def test_a_millisecond_timestamp_and_a_bigint_overflow_are_parked_and_the_good_reports_stored(
    dead: Any, alice: Person
) -> None:
    before = {r: dead_lettered(r) for r in ("timestamp_out_of_range", "tokens_out_of_range")}
    ids = {}
    for name, body in (
        ("good-0", report(alice, "req-good-0")),
        ("ms", report(alice, "req-ms", at=1_764_000_000_000)),
        ("good-1", report(alice, "req-good-1")),
        ("huge", report(alice, "req-huge", completion=2**63)),  # beyond PostgreSQL bigint
        ("good-2", report(alice, "req-good-2")),
    ):
        ids[name] = stream_id = dead.xadd(USAGE_STREAM, {"report": body}).decode()
        assert stream_id

    assert UsageStreamConsumer(name="control-1", block_ms=10).drain() == 5

    assert stored(alice) == [("req-good-0", 10), ("req-good-1", 10), ("req-good-2", 10)]
    assert ledgered(alice) == 6
    assert dead.xpending(USAGE_STREAM, USAGE_GROUP)["pending"] == 0
    assert dead.xlen(USAGE_STREAM) == 0
    letters = parked(dead)
    assert set(letters) == {ids["ms"], ids["huge"]}
    assert letters[ids["ms"]]["reason"] == "timestamp_out_of_range"
    assert letters[ids["huge"]]["reason"] == "tokens_out_of_range"
    # The original report travels unchanged, for an operator to fix and replay.
    assert orjson.loads(letters[ids["ms"]]["report"])["at"] == 1_764_000_000_000
    assert orjson.loads(letters[ids["huge"]]["report"])["completion_tokens"] == 2**63
    assert dead_lettered("timestamp_out_of_range") == before["timestamp_out_of_range"] + 1
    assert dead_lettered("tokens_out_of_range") == before["tokens_out_of_range"] + 1

    # Another consumer, claiming whatever is pending, finds nothing to store or park again.
    time.sleep(0.06)
    assert UsageStreamConsumer(name="control-2", block_ms=10, claim_idle_ms=50).drain() == 0
    assert stored(alice) == [("req-good-0", 10), ("req-good-1", 10), ("req-good-2", 10)]
    assert ledgered(alice) == 6
    assert dead.xlen(DEAD_STREAM) == 2


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"not json", "malformed"),
        (b"[1, 2]", "malformed"),
        (b'{"request_id": "req-x"}', "malformed"),
        (None, "malformed"),  # no `report` field at all
    ],
)
def test_an_entry_that_is_not_a_usage_report_is_parked_as_malformed(
    dead: Any, alice: Person, body: bytes | None, reason: str
) -> None:
    fields = {"report": body} if body is not None else {"other": b"x"}
    entry_id = dead.xadd(USAGE_STREAM, fields).decode()
    dead.xadd(USAGE_STREAM, {"report": report(alice, "req-fine")})

    assert UsageStreamConsumer(name="control-1", block_ms=10).drain() == 2

    assert stored(alice) == [("req-fine", 10)]
    assert parked(dead)[entry_id]["reason"] == reason
    assert dead.xpending(USAGE_STREAM, USAGE_GROUP)["pending"] == 0


@pytest.mark.parametrize(
    "change",
    [
        {"at": time.time() * 1_000_000},  # microseconds
        {"at": 86_400.0},  # 1970
        {"at": time.time() + 5 * 366 * 86_400},  # five years ahead
    ],
)
def test_a_report_dated_outside_the_sane_window_is_parked(
    dead: Any, alice: Person, change: dict[str, Any]
) -> None:
    body = orjson.dumps({**orjson.loads(report(alice, "req-when")), **change})
    entry_id = dead.xadd(USAGE_STREAM, {"report": body}).decode()
    UsageStreamConsumer(name="control-1", block_ms=10).drain()
    assert stored(alice) == []
    assert parked(dead)[entry_id]["reason"] == "timestamp_out_of_range"


@pytest.fixture
def poison_rule(db: None) -> None:
    """A rule of the database that validation does not know about (think: a column
    narrowed by a migration): an INSERT of the report `req-poison` fails."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(
            "ALTER TABLE inference_usagerecord ADD CONSTRAINT test_no_poison "
            "CHECK (request_id <> 'req-poison')"
        )


def test_a_row_the_database_refuses_despite_validation_is_parked_and_the_rest_stored(
    dead: Any, alice: Person, poison_rule: None
) -> None:
    before = dead_lettered("database_rejected")
    entry_id = ""
    for name in ("req-a", "req-poison", "req-b"):
        added = dead.xadd(USAGE_STREAM, {"report": report(alice, name)}).decode()
        entry_id = added if name == "req-poison" else entry_id

    assert UsageStreamConsumer(name="control-1", block_ms=10).drain() == 3

    assert stored(alice) == [("req-a", 10), ("req-b", 10)]
    assert ledgered(alice) == 4
    letters = parked(dead)
    assert list(letters) == [entry_id]
    assert letters[entry_id]["reason"] == "database_rejected"
    assert "test_no_poison" in letters[entry_id]["error"]
    assert dead_lettered("database_rejected") == before + 1
    assert dead.xpending(USAGE_STREAM, USAGE_GROUP)["pending"] == 0


def test_a_database_outage_parks_nothing_and_the_batch_is_stored_when_it_is_back(
    dead: Any, alice: Person
) -> None:
    import psycopg
    from django.db import OperationalError, connection

    for i in range(3):
        dead.xadd(USAGE_STREAM, {"report": report(alice, f"req-{i}")})
    with connection.cursor() as cursor:
        cursor.execute("SET lock_timeout = '100ms'")
    # Another session holds a lock that blocks every INSERT into the usage table: to the
    # consumer the database is unavailable (an OperationalError), not refusing a row.
    db = settings.DATABASES["default"]
    blocker = psycopg.connect(
        host=db["HOST"], port=db["PORT"] or 5432, user=db["USER"], dbname=db["NAME"]
    )
    try:
        blocker.execute("LOCK TABLE inference_usagerecord IN SHARE MODE")
        consumer = UsageStreamConsumer(name="control-1", block_ms=10, claim_idle_ms=50)
        with pytest.raises(OperationalError):
            consumer.drain()
    finally:
        blocker.rollback()
        blocker.close()

    assert stored(alice) == []
    assert dead.xlen(DEAD_STREAM) == 0
    assert dead.xpending(USAGE_STREAM, USAGE_GROUP)["pending"] == 3  # left for a retry

    time.sleep(0.06)
    assert consumer.drain() == 3
    assert stored(alice) == [("req-0", 10), ("req-1", 10), ("req-2", 10)]
    assert dead.xpending(USAGE_STREAM, USAGE_GROUP)["pending"] == 0
    assert dead.xlen(DEAD_STREAM) == 0


def test_an_operator_replays_a_dead_letter_once_its_cause_is_fixed(
    dead: Any, alice: Person, poison_rule: None
) -> None:
    from io import StringIO

    from django.core.management import call_command
    from django.db import connection

    dead.xadd(USAGE_STREAM, {"report": report(alice, "req-poison")})
    dead.xadd(USAGE_STREAM, {"report": b"garbage"})
    consumer = UsageStreamConsumer(name="control-1", block_ms=10)
    consumer.drain()
    assert stored(alice) == []

    listing = StringIO()
    call_command("usage_dead_letters", stdout=listing)
    assert "database_rejected" in listing.getvalue()
    assert "malformed" in listing.getvalue()

    with connection.cursor() as cursor:  # the fix
        cursor.execute("ALTER TABLE inference_usagerecord DROP CONSTRAINT test_no_poison")
    out = StringIO()
    call_command("usage_dead_letters", "--replay", "--reason", "database_rejected", stdout=out)
    assert "1 dead letter(s) replayed" in out.getvalue()
    assert consumer.drain() == 1

    assert stored(alice) == [("req-poison", 10)]
    assert ledgered(alice) == 2
    assert [f[b"reason"] for _, f in dead.xrange(DEAD_STREAM)] == [b"malformed"]


def test_a_read_that_blocks_longer_than_the_redis_timeout_does_not_time_out(
    stream: Any, settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from controlplane.core import redis_clients

    settings.LIMITS_REDIS_TIMEOUT_SECONDS = 0.2
    monkeypatch.setattr(redis_clients, "_sync", {})  # clients built under this timeout
    consumer = UsageStreamConsumer(name="idle", block_ms=600)

    started = time.monotonic()
    assert consumer.drain() == 0  # XREADGROUP BLOCK 600 ms on an empty stream
    assert time.monotonic() - started >= 0.5
