"""The ledger: every billable event once, however often it is reported; never changed."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
from django.db import DatabaseError, connection, transaction

from controlplane.billing import meters
from controlplane.billing.ledger import Entry, ledger_append, ledger_append_many
from controlplane.billing.models import AppendOnlyError, LedgerEntry, Meter
from controlplane.datasets.models import DatasetVersion, File
from controlplane.inference.tasks import record_usage
from tests.support.people import Person
from tests.support.usage import usage_report

pytestmark = pytest.mark.django_db
AT = datetime(2027, 1, 15, 12, 0, tzinfo=UTC)


def entries(person: Person) -> list[LedgerEntry]:
    return list(LedgerEntry.objects.for_organization(person.organization).order_by("meter", "pk"))


def report(person: Person, request_id: str = "chatcmpl-1") -> dict[str, Any]:
    return usage_report(
        request_id=request_id, organization_id=person.organization.pk, at=AT.timestamp()
    ).to_json()


def test_the_same_usage_report_delivered_three_times_is_ledgered_once(alice: Person) -> None:
    payload = report(alice)
    outcomes = [record_usage(payload) for _ in range(3)]  # the control task itself

    assert outcomes == ["applied", "duplicate", "duplicate"]
    rows = entries(alice)
    assert [(e.meter, e.quantity) for e in rows] == [
        (Meter.COMPLETION_TOKENS, 30),
        (Meter.PROMPT_TOKENS, 12),
    ]
    assert {e.reference for e in rows} == {"chatcmpl-1"}
    assert {e.occurred_at for e in rows} == {AT}


def test_a_reporter_killed_after_commit_before_ack_adds_nothing_when_rerun(alice: Person) -> None:
    payload = report(alice, "chatcmpl-crash")
    # The first delivery commits, then its worker dies before acknowledging: the
    # broker delivers the same message again to another worker.
    assert record_usage(payload) == "applied"
    before = [(e.pk, e.meter, e.quantity) for e in entries(alice)]
    assert record_usage(payload) == "duplicate"
    assert [(e.pk, e.meter, e.quantity) for e in entries(alice)] == before


def test_a_reporter_killed_before_commit_leaves_nothing_and_the_retry_bills_once(
    alice: Person,
) -> None:
    payload = report(alice, "chatcmpl-rollback")

    class Killed(Exception):
        pass

    def dies_mid_transaction() -> None:
        with transaction.atomic():
            record_usage(payload)
            raise Killed  # nothing commits

    with pytest.raises(Killed):
        dies_mid_transaction()
    assert entries(alice) == []
    assert record_usage(payload) == "applied"
    assert sum(e.quantity for e in entries(alice)) == 42


def test_append_many_counts_only_new_entries(alice: Person) -> None:
    batch = [
        Entry(
            organization_id=alice.organization.pk,
            idempotency_key=f"k{i}",
            meter=Meter.PROMPT_TOKENS,
            quantity=i + 1,
            occurred_at=AT,
            source="test",
        )
        for i in range(5)
    ]
    assert ledger_append_many(batch) == 5
    assert ledger_append_many([*batch[3:], batch[0]]) == 0
    assert len(entries(alice)) == 5


def test_a_malformed_entry_writes_nothing(alice: Person) -> None:
    good = dict(organization_id=alice.organization.pk, occurred_at=AT, source="t")
    with pytest.raises(ValueError, match="meter"):
        ledger_append(idempotency_key="a", meter="gold.bars", quantity=1, **good)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="negative"):
        ledger_append(idempotency_key="b", meter=Meter.PROMPT_TOKENS, quantity=-1, **good)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="1 to 255"):
        ledger_append(idempotency_key="x" * 256, meter=Meter.PROMPT_TOKENS, quantity=1, **good)  # type: ignore[arg-type]
    assert entries(alice) == []


def test_ledger_entries_cannot_be_changed_or_deleted(alice: Person) -> None:
    ledger_append(
        organization_id=alice.organization.pk,
        idempotency_key="once",
        meter=Meter.PROMPT_TOKENS,
        quantity=7,
        occurred_at=AT,
        source="test",
    )
    (row,) = entries(alice)
    row.quantity = 1
    with pytest.raises(AppendOnlyError):
        row.save()
    with pytest.raises(AppendOnlyError):
        row.delete()
    with pytest.raises(AppendOnlyError):
        LedgerEntry.objects.for_organization(alice.organization).update(quantity=0)
    with pytest.raises(AppendOnlyError):
        LedgerEntry.objects.for_organization(alice.organization).delete()
    # And the database itself refuses, whatever the client.
    for sql in (
        "UPDATE billing_ledgerentry SET quantity = 0",
        "DELETE FROM billing_ledgerentry",
    ):
        with (
            pytest.raises(DatabaseError, match="append-only"),
            transaction.atomic(),
            connection.cursor() as cursor,
        ):
            cursor.execute(sql)
    (row,) = entries(alice)
    assert row.quantity == 7


def test_a_compression_job_is_billed_once(alice: Person) -> None:
    for _ in range(2):
        meters.compression_to_ledger(
            organization_id=alice.organization.pk, job_id="cjob-1", model="m", at=AT
        )
    assert [(e.meter, e.quantity, e.reference) for e in entries(alice)] == [
        (Meter.COMPRESSION_JOB, 1, "cjob-1")
    ]


def _file(person: Person, size: int, created: datetime, deleted: datetime | None = None) -> None:
    f = File.objects.create(
        organization=person.organization,
        filename="a.jsonl",
        purpose="fine-tune",
        bytes=size,
        sha256="0" * 64,
        deleted_at=deleted,
    )
    File.objects.for_organization(person.organization).filter(pk=f.pk).update(created_at=created)


def test_storage_is_metered_per_organization_and_day_once(alice: Person, charlie: Person) -> None:
    _file(alice, 1_500_000, datetime(2027, 1, 1, tzinfo=UTC))
    _file(alice, 500_001, datetime(2027, 1, 1, tzinfo=UTC))
    gone = datetime(2027, 1, 9, tzinfo=UTC)
    _file(alice, 9_000_000, datetime(2026, 12, 1, tzinfo=UTC), deleted=gone)
    _file(alice, 9_000_000, datetime(2027, 1, 11, tzinfo=UTC))  # not yet there
    _file(charlie, 1, datetime(2027, 1, 1, tzinfo=UTC))
    assert DatasetVersion.objects.for_organization(alice.organization).count() == 0

    day = datetime(2027, 1, 10, tzinfo=UTC).date()
    assert meters.storage_meter_day(day=day) == 2
    assert meters.storage_meter_day(day=day) == 0  # the beat ran twice
    (a,) = entries(alice)
    assert (a.meter, a.quantity, a.idempotency_key) == (
        Meter.STORAGE_MB_DAY,
        3,  # 2.000001 MB, rounded up
        f"storage:{alice.organization.pk}:2027-01-10",
    )
    (c,) = entries(charlie)
    assert c.quantity == 1


def test_royalty_entries_carry_the_listing_price_they_were_earned_at(alice: Person) -> None:
    meters.royalty_to_ledger(
        partner_id=alice.organization.pk,
        listing_id="lst_1",
        job_id="ftjob-1",
        customer_id="org_x",
        trained_tokens=2000,
        price_per_1k_tokens=Decimal("0.25"),
        at=AT,
    )
    (row,) = entries(alice)
    assert (row.meter, row.model, row.unit_price, row.per_units) == (
        Meter.ROYALTY_TOKENS,
        "lst_1",
        Decimal("0.25"),
        1000,
    )


def test_a_usage_batch_from_the_stream_redelivered_three_times_is_ledgered_once(
    alice: Person, charlie: Person
) -> None:
    from controlplane.inference.usage import usage_record_many

    batch = [report(alice, f"chatcmpl-b{i}") for i in range(4)] + [report(charlie, "chatcmpl-c")]
    outcomes = [usage_record_many(batch) for _ in range(3)]

    assert outcomes[0]["applied"] == 5
    assert outcomes[1]["duplicate"] == outcomes[2]["duplicate"] == 5
    assert sum(e.quantity for e in entries(alice)) == 4 * 42
    assert len(entries(alice)) == 8
    assert [(e.meter, e.quantity) for e in entries(charlie)] == [
        (Meter.COMPLETION_TOKENS, 30),
        (Meter.PROMPT_TOKENS, 12),
    ]
