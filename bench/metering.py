"""Metering: ledger write throughput and rating a month of usage, on PostgreSQL.

    .venv/bin/python bench/metering.py            # ~1-2 min on 2 cores
    .venv/bin/python bench/metering.py --quick    # 20k events, 100k rated rows
    .venv/bin/python bench/metering.py --help

Two measurements, in one run, against a throw-away database
(`atelier_bench_metering`, migrated from scratch and dropped at the end):

- ledger writes: the same N usage events written with the platform's batched
  writer (`controlplane.billing.ledger.ledger_append_many`: one
  `INSERT ... SELECT FROM unnest(...) ON CONFLICT (idempotency_key) DO NOTHING`
  per batch) and, as bare baselines, with a plain one-row-per-statement INSERT
  loop and with COPY (no duplicate check at all: PostgreSQL's floor for these
  rows and indexes). Then the same events sent again (every one a duplicate),
  which is what a redelivered batch costs. Each method starts from an empty
  table (TRUNCATE), in one transaction, committed. Target: >= 5,000 events/s.
- rating: 1,000,000 usage events across 1,000 organizations in one month,
  generated in the database (generate_series), then priced the way the invoice
  run prices them (`controlplane.billing.rating.usage_lines_all`: one set-based
  query, ledger joined to the price book by time range, GROUP BY in the
  database). Target: <= 30 s. Also timed: rating plus plan proration for each
  organization (what the invoice run does before storing).

- the rate-limit check per request: bench/metering_limits.py (run from here, in its
  own process, unless --skip-limits), μs per `check`/`acheck` against a bare Redis
  PING in the same run, and Redis round trips per check (target: 1).

It prints the tables and writes bench/results/metering.json (the rate-limit
figures also in bench/results/metering_limits.json, under "rate_limits" here).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform as host
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "platform"), str(REPO / "workers")]


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    p.add_argument("--events", type=int, default=100_000, help="ledger events to write")
    p.add_argument("--batch", type=int, default=2000, help="events per batched INSERT")
    p.add_argument("--rated", type=int, default=1_000_000, help="usage events to rate")
    p.add_argument("--orgs", type=int, default=1000, help="organizations")
    p.add_argument("--rounds", type=int, default=3, help="rounds per measurement (best counts)")
    p.add_argument(
        "--postgres",
        default=os.environ.get("BENCH_POSTGRES_URL", "postgres://postgres@127.0.0.1:5432"),
        help="PostgreSQL server (no database part); env BENCH_POSTGRES_URL",
    )
    p.add_argument("--database", default="atelier_bench_metering")
    p.add_argument("--output", type=Path, default=REPO / "bench" / "results" / "metering.json")
    p.add_argument("--skip-limits", action="store_true", help="skip the rate-limit measurement")
    args = p.parse_args()
    if args.quick:
        args.events, args.rated, args.orgs, args.rounds = 20_000, 100_000, 100, 1
    return args


def database_recreate(postgres: str, name: str, *, create: bool = True) -> None:
    import psycopg
    from psycopg import sql

    with psycopg.connect(f"{postgres}/postgres", autocommit=True, connect_timeout=5) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )
        if create:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))


def django_setup(args: argparse.Namespace) -> None:
    os.environ["DJANGO_SETTINGS_MODULE"] = "controlplane.settings.test"
    os.environ["DATABASE_URL"] = f"{args.postgres}/{args.database}"
    os.environ.setdefault("REDIS_URL", "redis://127.0.0.1:6379/13")
    os.environ["LOG_LEVEL"] = "WARNING"
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0, interactive=False)


def organizations(n: int) -> list[str]:
    from controlplane.tenancy.models import Organization

    orgs = [
        Organization(
            id=f"org_bench{i:05d}", name=f"Bench {i}", plan="pro" if i % 10 == 0 else "free"
        )
        for i in range(n)
    ]
    Organization.objects.bulk_create(orgs)
    Organization.objects.all().update(created_at=datetime(2025, 1, 1, tzinfo=UTC))
    return [o.pk for o in orgs]


def truncate() -> None:
    from django.db import connection

    with connection.cursor() as cursor:
        # TRUNCATE is not a row operation: the append-only trigger (UPDATE/DELETE) allows it.
        cursor.execute("TRUNCATE billing_ledgerentry")


def events(n: int, orgs: list[str], start: datetime) -> list[Any]:
    from controlplane.billing.ledger import Entry

    out = []
    for i in range(n):
        request = i // 2
        out.append(
            Entry(
                organization_id=orgs[request % len(orgs)],
                idempotency_key=f"inference:req-{request}:{i % 2}",
                meter="inference.prompt_tokens" if i % 2 == 0 else "inference.completion_tokens",
                quantity=10 + i % 500,
                occurred_at=start + timedelta(milliseconds=i * 37),
                source="inference.usage",
                model=f"model-{request % 5}",
                api_key_id=f"key_{request % 50}",
                reference=f"req-{request}",
            )
        )
    return out


def timed(fn: Any) -> float:
    from django.db import transaction

    t0 = time.perf_counter()
    with transaction.atomic():
        fn()
    return time.perf_counter() - t0


def bench_writes(args: argparse.Namespace, orgs: list[str]) -> dict[str, Any]:
    from django.conf import settings
    from django.db import connection

    from controlplane.billing.ledger import ledger_append_many

    settings.BILLING_LEDGER_BATCH_SIZE = args.batch
    rows = events(args.events, orgs, datetime(2026, 2, 1, tzinfo=UTC))
    tuples = [e.row() for e in rows]
    columns = (
        "organization_id, idempotency_key, meter, model, quantity, occurred_at, source, "
        "api_key_id, member_id, project_id, reference, unit_price, per_units"
    )
    one = (
        "INSERT INTO billing_ledgerentry (" + columns + ") VALUES (" + ", ".join(["%s"] * 13) + ")"
    )

    def batched() -> None:
        assert ledger_append_many(rows) == len(rows)

    def replay() -> None:
        assert ledger_append_many(rows) == 0

    def loop() -> None:
        with connection.cursor() as cursor:
            for row in tuples:
                cursor.execute(one, row)

    def copy() -> None:
        buffer = io.StringIO()
        for row in tuples:
            buffer.write(
                "\t".join(
                    "\\N" if v is None else (v.isoformat() if isinstance(v, datetime) else str(v))
                    for v in row
                )
                + "\n"
            )
        with connection.cursor() as cursor:
            raw = cursor.cursor  # psycopg's own cursor: COPY FROM STDIN
            with raw.copy(f"COPY billing_ledgerentry ({columns}) FROM STDIN") as feed:
                feed.write(buffer.getvalue())

    times: dict[str, list[float]] = {"batched": [], "replay": [], "loop": [], "copy": []}
    for _ in range(args.rounds):
        for name, fn in (("batched", batched), ("loop", loop), ("copy", copy)):
            truncate()
            times[name].append(timed(fn))
            if name == "batched":
                times["replay"].append(timed(replay))
    truncate()
    best = {k: min(v) for k, v in times.items()}
    rate = {k: args.events / v for k, v in best.items()}
    return {
        "events": args.events,
        "batch_size": args.batch,
        "seconds_best": best,
        "seconds_all": times,
        "events_per_second": rate,
        "ratio_batched_vs_insert_loop": rate["batched"] / rate["loop"],
        "ratio_batched_vs_copy": rate["batched"] / rate["copy"],
        "target_events_per_second": 5000,
        "target_met": rate["batched"] >= 5000,
    }


_GENERATE = """
INSERT INTO billing_ledgerentry (
    organization_id, idempotency_key, meter, model, quantity, occurred_at, source,
    api_key_id, reference
)
SELECT 'org_bench' || lpad((g %% %(orgs)s)::text, 5, '0'),
       'bench:' || g,
       CASE WHEN g %% 2 = 0 THEN 'inference.prompt_tokens' ELSE 'inference.completion_tokens' END,
       'model-' || (g %% 7),
       10 + g %% 900,
       %(start)s::timestamptz + (g::float8 / %(n)s) * interval '28 days',
       'inference.usage',
       'key_' || (g %% 97),
       'req-' || (g / 2)
FROM generate_series(0, %(n)s - 1) AS g
"""


def bench_rating(args: argparse.Namespace, orgs: list[str]) -> dict[str, Any]:
    from django.db import connection

    from controlplane.billing.prices import price_set
    from controlplane.billing.rating import month_bounds, rate_period, usage_lines_all
    from controlplane.tenancy.models import Organization

    start, end = month_bounds(datetime(2026, 2, 1, tzinfo=UTC).date())
    # A price change mid-month and a model-specific price: rating must pick per event.
    price_set(
        meter="inference.prompt_tokens",
        unit_price=Decimal("0.60"),
        effective_from=start + timedelta(days=14),
    )
    price_set(
        meter="inference.completion_tokens",
        model="model-3",
        unit_price=Decimal("3.00"),
        effective_from=datetime(2025, 1, 1, tzinfo=UTC),
    )
    truncate()
    t0 = time.perf_counter()
    with connection.cursor() as cursor:
        cursor.execute(_GENERATE, {"orgs": len(orgs), "n": args.rated, "start": start})
        cursor.execute("ANALYZE billing_ledgerentry")
    generate_s = time.perf_counter() - t0

    query_times, full_times = [], []
    lines = 0
    total = Decimal(0)
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        usage = usage_lines_all(start=start, end=end)
        query_times.append(time.perf_counter() - t0)
        lines = sum(len(v) for v in usage.values())
        t0 = time.perf_counter()
        usage = usage_lines_all(start=start, end=end)
        total = Decimal(0)
        for org in Organization.objects.filter(pk__in=orgs):
            for line in rate_period(
                organization=org, start=start, end=end, usage=usage.get(org.pk, [])
            ):
                total += line.amount
        full_times.append(time.perf_counter() - t0)
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*), sum(quantity) FROM billing_ledgerentry")
        count, quantity = cursor.fetchone()
    assert count == args.rated
    return {
        "events": args.rated,
        "organizations": len(orgs),
        "quantity": int(quantity),
        "generate_seconds": generate_s,
        "rating_query_seconds_best": min(query_times),
        "rating_query_seconds_all": query_times,
        "rating_with_plans_seconds_best": min(full_times),
        "rating_with_plans_seconds_all": full_times,
        "usage_lines": lines,
        "invoiced_total_usd": str(total),
        "target_seconds": 30,
        "target_met": min(full_times) <= 30,
    }


def print_table(results: dict[str, Any]) -> None:
    w = results["ledger_writes"]
    r = results["rating"]
    eps = w["events_per_second"]
    print()
    print(f"Ledger writes: {w['events']:,} events, batches of {w['batch_size']} (best of rounds)")
    print(f"  {'method':<44} {'events/s':>12} {'seconds':>9}")
    for name, label in (
        ("batched", "batched writer (INSERT..unnest ON CONFLICT)"),
        ("replay", "same events again (all duplicates)"),
        ("loop", "bare: one INSERT per event"),
        ("copy", "bare: COPY (no duplicate check)"),
    ):
        print(f"  {label:<44} {eps[name]:>12,.0f} {w['seconds_best'][name]:>9.3f}")
    print(
        f"  batched / insert loop: {w['ratio_batched_vs_insert_loop']:.1f}x; "
        f"batched / COPY: {w['ratio_batched_vs_copy']:.2f}x; "
        f"target >= 5,000/s: {'met' if w['target_met'] else 'MISSED'}"
    )
    print()
    print(f"Rating: {r['events']:,} events, {r['organizations']:,} organizations, one month")
    print(f"  generate rows (generate_series)       {r['generate_seconds']:>8.2f} s")
    print(f"  rating query (one GROUP BY, priced)   {r['rating_query_seconds_best']:>8.2f} s")
    print(f"  rating + plans per organization       {r['rating_with_plans_seconds_best']:>8.2f} s")
    print(
        f"  {r['usage_lines']:,} usage lines, {r['invoiced_total_usd']} USD; "
        f"target <= 30 s: {'met' if r['target_met'] else 'MISSED'}"
    )
    m = results["machine"]
    print(f"\n{m['cpus']} CPUs, PostgreSQL {m['postgres']}, Python {m['python']}")


def main() -> int:
    args = parse()
    database_recreate(args.postgres, args.database)
    try:
        django_setup(args)
        from django.db import connection

        orgs = organizations(args.orgs)
        writes = bench_writes(args, orgs)
        rating = bench_rating(args, orgs)
        with connection.cursor() as cursor:
            cursor.execute("SHOW server_version")
            pg = cursor.fetchone()[0]
        connection.close()
    finally:
        from django.db import connections

        connections.close_all()
        database_recreate(args.postgres, args.database, create=False)
    results = {
        "benchmark": "metering",
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "ledger_writes": writes,
        "rating": rating,
        "machine": {
            "cpus": os.cpu_count(),
            "postgres": pg,
            "python": host.python_version(),
            "load_average_start": os.getloadavg()[0],
        },
        "settings": {k: v for k, v in vars(args).items() if k != "output"},
        "median_write_seconds": {k: statistics.median(v) for k, v in writes["seconds_all"].items()},
    }
    print_table(results)
    if not args.skip_limits:
        limits_json = args.output.with_name("metering_limits.json")
        command = [sys.executable, str(REPO / "bench" / "metering_limits.py"), "--output"]
        command += [str(limits_json), "--postgres", args.postgres]
        if args.quick:
            command += ["--n", "2000"]
        subprocess.run(command, check=True)
        results["rate_limits"] = json.loads(limits_json.read_text())
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
