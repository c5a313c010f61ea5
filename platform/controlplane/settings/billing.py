"""Billing: metering, limits, budgets, plans."""

from celery.schedules import crontab

from .env import env

#: How long a process keeps a Plan row before reading it again (admin edits reach
#: every process within this time).
BILLING_PLAN_CACHE_SECONDS = env.float("BILLING_PLAN_CACHE_SECONDS", default=30.0)
#: Largest window `GET /v1/organization/usage|costs` answers per page of buckets.
BILLING_USAGE_MAX_BUCKETS = {"1m": 1440, "1h": 168, "1d": 31}
#: Ledger entries one batched write sends to PostgreSQL at once.
BILLING_LEDGER_BATCH_SIZE = env.int("BILLING_LEDGER_BATCH_SIZE", default=2000)
#: When the beat runs the daily storage meter (hour, UTC) and the monthly invoice run (day 1).
BILLING_STORAGE_METER_HOUR = env.int("BILLING_STORAGE_METER_HOUR", default=0)
BILLING_INVOICE_RUN_HOUR = env.int("BILLING_INVOICE_RUN_HOUR", default=2)

BILLING_BEAT_SCHEDULE = {
    "billing-storage-meter": {
        "task": "controlplane.billing.storage_meter",
        "schedule": crontab(minute=15, hour=BILLING_STORAGE_METER_HOUR),
    },
    "billing-invoice-run": {
        "task": "controlplane.billing.invoice_run",
        "schedule": crontab(minute=0, hour=BILLING_INVOICE_RUN_HOUR, day_of_month=1),
    },
}
