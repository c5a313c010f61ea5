"""The ledger refuses UPDATE and DELETE in the database itself; seed plans and prices.

Plans start from settings.PLANS (concurrency) plus the limits below; after this
they are data, edited in the admin. Prices start at a wildcard row per meter,
effective from 2020-01-01 UTC.
"""

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.db import migrations

APPEND_ONLY = """
CREATE OR REPLACE FUNCTION billing_ledger_append_only() RETURNS trigger AS $$
BEGIN
    RAISE EXCEPTION 'billing_ledgerentry is append-only: % refused', TG_OP
        USING ERRCODE = 'raise_exception';
END;
$$ LANGUAGE plpgsql;
CREATE TRIGGER billing_ledger_append_only
    BEFORE UPDATE OR DELETE ON billing_ledgerentry
    FOR EACH ROW EXECUTE FUNCTION billing_ledger_append_only();
"""
DROP_APPEND_ONLY = """
DROP TRIGGER IF EXISTS billing_ledger_append_only ON billing_ledgerentry;
DROP FUNCTION IF EXISTS billing_ledger_append_only();
"""


def append_only(apps: Any, schema_editor: Any) -> None:
    schema_editor.execute(APPEND_ONLY, params=None)  # '%' is plpgsql's, not a placeholder


def drop_append_only(apps: Any, schema_editor: Any) -> None:
    schema_editor.execute(DROP_APPEND_ONLY, params=None)


PLANS: dict[str, dict[str, Any]] = {
    "free": {
        "name": "Free",
        "monthly_price": Decimal("0.00"),
        "included_amount": Decimal("1.00"),
        "requests_per_minute": 20,
        "tokens_per_minute": 40_000,
        "requests_per_day": 1_000,
        "max_tokens_cap": 2_048,
        "max_n": 4,
    },
    "pro": {
        "name": "Pro",
        "monthly_price": Decimal("29.00"),
        "included_amount": Decimal("10.00"),
        "requests_per_minute": 600,
        "tokens_per_minute": 1_000_000,
        "requests_per_day": None,
        "max_tokens_cap": 8_192,
        "max_n": 16,
    },
    "enterprise": {
        "name": "Enterprise",
        "monthly_price": Decimal("500.00"),
        "included_amount": Decimal("200.00"),
        "requests_per_minute": 6_000,
        "tokens_per_minute": 10_000_000,
        "requests_per_day": None,
        "max_tokens_cap": None,
        "max_n": 128,
    },
}

SINCE = datetime(2020, 1, 1, tzinfo=UTC)
PRICES = [
    ("inference.prompt_tokens", "1M tokens", 1_000_000, Decimal("0.50")),
    ("inference.completion_tokens", "1M tokens", 1_000_000, Decimal("1.50")),
    ("training.tokens", "1M tokens", 1_000_000, Decimal("8.00")),
    ("compression.job", "job", 1, Decimal("2.00")),
    ("storage.mb_day", "GB-day", 1_000, Decimal("0.005")),
]


def seed(apps: Any, schema_editor: Any) -> None:
    Plan = apps.get_model("billing", "Plan")
    PriceBookEntry = apps.get_model("billing", "PriceBookEntry")
    defaults = getattr(settings, "PLANS", {})
    for code, values in PLANS.items():
        concurrency = int(
            (defaults.get(code) or {}).get(
                "concurrent_fine_tuning_jobs", {"free": 1, "pro": 4}.get(code, 16)
            )
        )
        Plan.objects.update_or_create(
            code=code, defaults={**values, "concurrent_fine_tuning_jobs": concurrency}
        )
    for meter, unit, per_units, price in PRICES:
        if not PriceBookEntry.objects.filter(meter=meter, model="*").exists():
            PriceBookEntry.objects.create(
                meter=meter,
                model="*",
                unit=unit,
                per_units=per_units,
                unit_price=price,
                effective_from=SINCE,
            )


class Migration(migrations.Migration):
    dependencies = [("billing", "0001_initial")]

    operations = [
        migrations.RunPython(append_only, drop_append_only),
        migrations.RunPython(seed, migrations.RunPython.noop),
    ]
