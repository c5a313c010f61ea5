"""The billable events other apps report, each turned into ledger entries once.

Each function names the event's own identity as the idempotency key, so calling
it again for the same event (a retried task, a second report) adds nothing.
They run in the caller's transaction: the entry commits with the state change
that caused it (the job's success, the partner's usage row).
"""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from typing import Any

import structlog
from django.db import connection, transaction

from .ledger import ledger_append
from .models import Meter

log = structlog.get_logger(__name__)


def training_to_ledger(
    *,
    organization_id: str,
    job_id: str,
    base_model: str,
    trained_tokens: int,
    at: datetime,
    engagement_id: str | None = None,
) -> int:
    """Bill a fine-tuning job's trained tokens, once per job (key `training:<job_id>`).

    Called where the job's `trained_tokens` is first written (its success report).
    A custom engagement's job (`engagement_id`) is charged to the engagement instead of
    the organization's self-serve bill.
    """
    return ledger_append(
        organization_id=organization_id,
        idempotency_key=f"training:{job_id}",
        meter=Meter.TRAINING_TOKENS,
        quantity=int(trained_tokens),
        occurred_at=at,
        source="jobs.training",
        model=base_model,
        reference=job_id,
        engagement_id=engagement_id,
    )


def royalty_to_ledger(
    *,
    partner_id: str,
    listing_id: str,
    job_id: str,
    customer_id: str,
    trained_tokens: int,
    price_per_1k_tokens: Decimal,
    at: datetime,
) -> int:
    """Credit a data partner for tokens a customer's job trained on its listing.

    The entry belongs to the partner (it is their earning, never invoiced to
    them), priced at the listing's price when the job ran: `unit_price` per
    1,000 tokens is stored on the entry, so a later price change on the listing
    does not change what was earned. Once per (job, listing). `model` holds the
    listing id (earnings are grouped per listing), `reference` the job id and
    `project_id` the customer organization.
    """
    return ledger_append(
        organization_id=partner_id,
        idempotency_key=f"royalty:{job_id}:{listing_id}",
        meter=Meter.ROYALTY_TOKENS,
        quantity=int(trained_tokens),
        occurred_at=at,
        source="datasets.royalty",
        model=listing_id,
        reference=job_id,
        project_id=customer_id,
        unit_price=price_per_1k_tokens,
        per_units=1000,
    )


def compression_to_ledger(
    *,
    organization_id: str,
    job_id: str,
    model: str,
    at: datetime,
    engagement_id: str | None = None,
) -> int:
    """Bill one finished compression job (key `compression:<job_id>`), priced per job.

    Called by the job's success handler, inside the transaction that marks it succeeded;
    an engagement's job (`engagement_id`) is charged to the engagement.
    """
    return ledger_append(
        organization_id=organization_id,
        idempotency_key=f"compression:{job_id}",
        meter=Meter.COMPRESSION_JOB,
        quantity=1,
        occurred_at=at,
        source="jobs.compression",
        model=model,
        reference=job_id,
        engagement_id=engagement_id,
    )


# Bytes each organization held during one UTC day [day, day+1): files not deleted
# before the day started, and ready dataset versions, created before it ended.
# Rounded up to whole megabytes (10^6 bytes) per organization and day.
_STORAGE_DAY = """
INSERT INTO billing_ledgerentry (
    organization_id, idempotency_key, meter, model, quantity, occurred_at, source,
    reference
)
SELECT held.organization_id,
       'storage:' || held.organization_id || ':' || %(day)s,
       'storage.mb_day', '', CEIL(SUM(held.bytes) / 1000000.0)::bigint,
       %(start)s::timestamptz, 'billing.storage', %(day)s
FROM (
    SELECT organization_id, bytes FROM datasets_file
    WHERE created_at < %(end)s AND (deleted_at IS NULL OR deleted_at >= %(start)s)
    UNION ALL
    SELECT organization_id, bytes FROM datasets_datasetversion
    WHERE created_at < %(end)s AND status = 'ready'
) AS held
GROUP BY held.organization_id
HAVING SUM(held.bytes) > 0
ON CONFLICT (idempotency_key) DO NOTHING
"""


@transaction.atomic
def storage_meter_day(*, day: date) -> int:
    """Ledger every organization's stored megabyte-days for one UTC day.

    One set-based statement for all organizations; idempotent per
    organization x day (key `storage:<org>:<YYYY-MM-DD>`), so the daily beat
    task may run again, or late, safely. Dataset versions count from their
    creation while ready; model artifacts carry no size in the registry yet and
    are not metered. Returns how many entries were new.
    """
    start = datetime.combine(day, time.min, tzinfo=UTC)
    params: dict[str, Any] = {
        "day": day.isoformat(),
        "start": start,
        "end": start + timedelta(days=1),
    }
    with connection.cursor() as cursor:
        cursor.execute(_STORAGE_DAY, params)
        new = int(cursor.rowcount)
    log.info("billing.storage_metered", day=day.isoformat(), entries=new)
    return new
