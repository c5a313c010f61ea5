"""Writing the usage ledger: every billable event once, however often it is reported.

Writers derive an `idempotency_key` from the event's own identity and insert with
`INSERT ... ON CONFLICT (idempotency_key) DO NOTHING`: a duplicate (a redelivered
report, a retried task, a reporter that died after its commit but before its ack)
adds nothing and is not an error. Every function returns how many entries were new.

These functions run in the caller's transaction when there is one, so an entry
commits (or rolls back) together with the record that caused it. They are
synchronous: the writers are Celery tasks and services, never the serving path.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Protocol

import structlog
from django.conf import settings
from django.db import connection

from controlplane.accounts.models import APIKey
from jobcontracts.inference import BATCH_REQUEST_PREFIX

from .models import Meter

log = structlog.get_logger(__name__)


class InferenceUsage(Protocol):
    """What the ledger reads of one stored inference request's usage (inference's
    `UsageRecord`: billing sits below inference and never imports it)."""

    @property
    def organization_id(self) -> str: ...
    @property
    def request_id(self) -> str: ...
    @property
    def model(self) -> str: ...
    @property
    def prompt_tokens(self) -> int: ...
    @property
    def completion_tokens(self) -> int: ...
    @property
    def created_at(self) -> datetime: ...
    @property
    def api_key_id(self) -> str | None: ...


@dataclass(frozen=True)
class Entry:
    """One event to append (the arguments of `ledger_append`)."""

    organization_id: str
    idempotency_key: str
    meter: str
    quantity: int
    occurred_at: datetime
    source: str
    model: str = ""
    api_key_id: str | None = None
    member_id: str | None = None
    project_id: str | None = None
    reference: str = ""
    unit_price: Decimal | None = None
    per_units: int | None = None
    engagement_id: str | None = None

    def check(self) -> None:
        if self.meter not in Meter.values:
            raise ValueError(f"unknown meter {self.meter!r}")
        if isinstance(self.quantity, bool) or not isinstance(self.quantity, int):
            raise ValueError(f"quantity must be an integer, not {self.quantity!r}")
        if self.quantity < 0:
            raise ValueError(f"quantity must not be negative ({self.quantity})")
        if not self.idempotency_key or len(self.idempotency_key) > 255:
            raise ValueError("idempotency_key must be 1 to 255 characters")
        if self.occurred_at.tzinfo is None:
            raise ValueError("occurred_at must be timezone-aware")
        if not self.organization_id:
            raise ValueError("organization_id is empty")

    def row(self) -> tuple[object, ...]:
        return (
            self.organization_id,
            self.idempotency_key,
            self.meter,
            self.model,
            self.quantity,
            self.occurred_at,
            self.source,
            self.api_key_id,
            self.member_id,
            self.project_id,
            self.reference,
            self.unit_price,
            self.per_units,
            self.engagement_id,
        )


def ledger_append_many(entries: Iterable[Entry]) -> int:
    """Append entries; return how many were new (the rest were already there).

    Zero-quantity entries are skipped (nothing to bill). Entries go to PostgreSQL
    in batches of BILLING_LEDGER_BATCH_SIZE, one multi-row INSERT each, with
    ON CONFLICT (idempotency_key) DO NOTHING: safe to call again with the same
    entries, concurrently too. Raises ValueError for a malformed entry before
    writing anything.
    """
    rows: list[tuple[object, ...]] = []
    for entry in entries:
        entry.check()
        if entry.quantity > 0:
            rows.append(entry.row())
    if not rows:
        return 0
    size = max(1, int(settings.BILLING_LEDGER_BATCH_SIZE))
    new = 0
    with connection.cursor() as cursor:
        for start in range(0, len(rows), size):
            new += _insert(cursor, rows[start : start + size])
    return new


#: One statement per batch, columns sent as arrays: a fixed query text (prepared
#: once by the server's plan cache), however many rows the batch has.
_INSERT = """
INSERT INTO billing_ledgerentry (
    organization_id, idempotency_key, meter, model, quantity, occurred_at, source,
    api_key_id, member_id, project_id, reference, unit_price, per_units, engagement_id
)
SELECT * FROM unnest(
    %s::varchar[], %s::varchar[], %s::varchar[], %s::varchar[], %s::bigint[],
    %s::timestamptz[], %s::varchar[], %s::varchar[], %s::varchar[], %s::varchar[],
    %s::varchar[], %s::numeric[], %s::bigint[], %s::varchar[]
)
ON CONFLICT (idempotency_key) DO NOTHING
"""


def _insert(cursor: object, batch: Sequence[tuple[object, ...]]) -> int:
    columns = [list(column) for column in zip(*batch, strict=True)]
    cursor.execute(_INSERT, columns)  # type: ignore[attr-defined]
    return int(cursor.rowcount)  # type: ignore[attr-defined]


def ledger_append(
    *,
    organization_id: str,
    idempotency_key: str,
    meter: str,
    quantity: int,
    occurred_at: datetime,
    source: str,
    model: str = "",
    api_key_id: str | None = None,
    member_id: str | None = None,
    project_id: str | None = None,
    reference: str = "",
    unit_price: Decimal | None = None,
    per_units: int | None = None,
    engagement_id: str | None = None,
) -> int:
    """Append one event; 1 if it was new, 0 if its idempotency key was already there."""
    new = ledger_append_many(
        [
            Entry(
                organization_id=organization_id,
                idempotency_key=idempotency_key,
                meter=meter,
                quantity=quantity,
                occurred_at=occurred_at,
                source=source,
                model=model,
                api_key_id=api_key_id,
                member_id=member_id,
                project_id=project_id,
                reference=reference,
                unit_price=unit_price,
                per_units=per_units,
                engagement_id=engagement_id,
            )
        ]
    )
    if new:
        log.info(
            "billing.ledger_appended",
            organization_id=organization_id,
            meter=meter,
            quantity=quantity,
            idempotency_key=idempotency_key,
        )
    return new


def inference_entries(
    *,
    organization_id: str,
    request_id: str,
    model: str,
    prompt_tokens: int,
    completion_tokens: int,
    occurred_at: datetime,
    api_key_id: str | None = None,
    member_id: str | None = None,
) -> list[Entry]:
    """The ledger entries of one inference request: prompt and completion tokens.

    Keys are `inference:<request_id>:prompt|completion`: the request id is the
    idempotency key of the request's usage, so however often it is reported,
    it is billed once.
    """
    common = {
        "organization_id": organization_id,
        "model": model,
        "occurred_at": occurred_at,
        "source": "inference.usage",
        "api_key_id": api_key_id,
        "member_id": member_id,
        "reference": request_id,
    }
    return [
        Entry(
            idempotency_key=f"inference:{request_id}:prompt",
            meter=Meter.PROMPT_TOKENS,
            quantity=prompt_tokens,
            **common,  # type: ignore[arg-type]
        ),
        Entry(
            idempotency_key=f"inference:{request_id}:completion",
            meter=Meter.COMPLETION_TOKENS,
            quantity=completion_tokens,
            **common,  # type: ignore[arg-type]
        ),
    ]


def member_of_key(api_key_id: str | None) -> str | None:
    """The membership id an API key acts for (None for a service key or no key)."""
    if not api_key_id:
        return None
    return (
        APIKey.objects.dangerously_unscoped()
        .filter(pk=api_key_id)
        .values_list("member_id", flat=True)
        .first()
    )


def inference_usage_to_ledger(record: InferenceUsage) -> int:
    """Ledger the tokens of one stored `UsageRecord` (called inside its transaction).
    A Batch API line is billed by its batch (at the batch price), not here."""
    if record.request_id.startswith(BATCH_REQUEST_PREFIX):
        return 0
    return ledger_append_many(
        inference_entries(
            organization_id=record.organization_id,
            request_id=record.request_id,
            model=record.model,
            prompt_tokens=record.prompt_tokens,
            completion_tokens=record.completion_tokens,
            occurred_at=record.created_at,
            api_key_id=record.api_key_id,
            member_id=member_of_key(record.api_key_id),
        )
    )


def inference_usage_many_to_ledger(records: Sequence[InferenceUsage]) -> int:
    """Ledger a batch of `UsageRecord`s (the usage stream's consumer), in its transaction.

    One query for the keys' members, one INSERT per BILLING_LEDGER_BATCH_SIZE
    entries. Records that were already ledgered (a redelivered batch, a
    concurrent consumer) add nothing: keys are `inference:<request_id>:...`.
    """
    if not records:
        return 0
    keys = {r.api_key_id for r in records if r.api_key_id}
    members = dict(
        APIKey.objects.dangerously_unscoped().filter(pk__in=keys).values_list("pk", "member_id")
    )
    entries: list[Entry] = []
    for record in records:
        if record.request_id.startswith(BATCH_REQUEST_PREFIX):
            continue  # billed by its batch, at the batch price
        entries += inference_entries(
            organization_id=record.organization_id,
            request_id=record.request_id,
            model=record.model,
            prompt_tokens=record.prompt_tokens,
            completion_tokens=record.completion_tokens,
            occurred_at=record.created_at,
            api_key_id=record.api_key_id,
            member_id=members.get(record.api_key_id) if record.api_key_id else None,
        )
    return ledger_append_many(entries)
