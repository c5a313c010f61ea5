"""Billing tasks on the `control` queue (celery beat): thin, named, safe to run twice."""

from __future__ import annotations

from datetime import timedelta

from celery import shared_task
from django.utils import timezone

from jobcontracts import queues

from . import invoicing, meters


@shared_task(
    name="controlplane.billing.storage_meter",
    queue=queues.CONTROL,
    acks_late=True,
    soft_time_limit=600,
    time_limit=900,
)
def storage_meter(day: str | None = None) -> int:
    """Ledger storage for `day` (ISO date; default yesterday, UTC). Idempotent per org x day."""
    from datetime import date

    when = date.fromisoformat(day) if day else (timezone.now() - timedelta(days=1)).date()
    return meters.storage_meter_day(day=when)


@shared_task(
    name="controlplane.billing.invoice_run",
    queue=queues.CONTROL,
    acks_late=True,
    soft_time_limit=3000,
    time_limit=3600,
)
def invoice_run(period: str | None = None) -> list[str]:
    """Invoice `period` (YYYY-MM; default the month that just ended). Idempotent."""
    from datetime import date

    if period:
        year, month = (int(part) for part in period.split("-"))
        when = date(year, month, 1)
    else:
        when = (timezone.now().replace(day=1) - timedelta(days=1)).date()
    return invoicing.invoice_run(period=when)
