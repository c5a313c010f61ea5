"""What the rate-limit check costs per request, and how many Redis round trips it makes.

    .venv/bin/python bench/metering_limits.py          # ~30 s
    .venv/bin/python bench/metering_limits.py --check  # exit 1 unless 1 round trip per check

In-process, against the local Redis and PostgreSQL (the ones the tests use): a
throw-away database is created and migrated, an organization signs up, and its
key gets its own limits, so every check runs the full script over six windows
(requests/min, tokens/min, requests/day for the key and for the organization).
Timed, one call after another on one connection (latency, not throughput):

- `PING`, blocking and asyncio: the bare round trip, the baseline every number
  is compared with in the same run (the ratio moves much less than the μs);
- `acheck` (one EVALSHA over six windows), and `aadjust` (the limits and budgets are
  async only: the serving path is their one caller that counts);
- `limits_for` from the in-process cache, and on a miss (plan + override queries);
- budgets: `areserve` and `asettle` with an organization and a key budget.

Round trips are counted for real, twice: client-side, by counting the commands
written on the limits' own Redis connections, and server-side, from the deltas
of `INFO commandstats` (server-wide: other clients of the same Redis add to
them, so they are an upper bound). Prints a table, writes
bench/results/metering_limits.json. The database is dropped and the Redis keys
deleted at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from api_auth import REPO, database_recreate, git_commit, machine_info, percentile

DB_NAME = "atelier_bench_limits"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--postgres", default="postgres://postgres@127.0.0.1:5432")
    parser.add_argument(
        "--redis",
        default="redis://127.0.0.1:6379/13",
        help="Redis (default db 13; a key prefix of its own, deleted at the end)",
    )
    parser.add_argument("--n", type=int, default=20_000, help="calls per measurement")
    parser.add_argument(
        "--output", type=Path, default=REPO / "bench" / "results" / "metering_limits.json"
    )
    parser.add_argument("--check", action="store_true", help="exit 1 unless 1 round trip/check")
    return parser.parse_args(argv)


def setup_django(args: argparse.Namespace, prefix: str) -> None:
    os.environ.update(
        DJANGO_SETTINGS_MODULE="controlplane.settings.local",
        DATABASE_URL=f"{args.postgres}/{DB_NAME}",
        REDIS_URL=args.redis,
        LIMITS_KEY_PREFIX=prefix,
        LOG_LEVEL="WARNING",
        DEBUG="false",
    )
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)


def stats_us(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "median_us": round(statistics.median(ordered) * 1e6, 1),
        "p99_us": round(percentile(ordered, 99) * 1e6, 1),
        "mean_us": round(statistics.fmean(ordered) * 1e6, 1),
        "n": len(ordered),
    }


def timed(fn: Callable[[], object], n: int) -> list[float]:
    for _ in range(min(500, n)):
        fn()
    out = []
    clock = time.perf_counter
    for _ in range(n):
        start = clock()
        fn()
        out.append(clock() - start)
    return out


async def atimed(fn: Callable[[], Awaitable[object]], n: int) -> list[float]:
    for _ in range(min(500, n)):
        await fn()
    out = []
    clock = time.perf_counter
    for _ in range(n):
        start = clock()
        await fn()
        out.append(clock() - start)
    return out


class Counting:
    """Counts commands written on a redis-py connection pool's connections (sync or async).

    Until `stop()`, every connection the pool hands out sends through a counter of
    this instance; the server's replies are untouched.
    """

    def __init__(self, pool: Any, *, is_async: bool) -> None:
        self.count = 0
        self.pool = pool
        original = pool.get_connection

        def wrap(connection: Any) -> Any:
            if not hasattr(connection, "_bench_send"):
                connection._bench_send = connection.send_packed_command
            send = connection._bench_send
            if is_async:

                async def counted_async(command: Any, check_health: bool = True) -> None:
                    self.count += 1
                    await send(command, check_health)

                connection.send_packed_command = counted_async
            else:

                def counted(command: Any, check_health: bool = True) -> None:
                    self.count += 1
                    send(command, check_health)

                connection.send_packed_command = counted
            return connection

        if is_async:

            async def get_async(*a: Any, **k: Any) -> Any:
                return wrap(await original(*a, **k))

            pool.get_connection = get_async
        else:
            pool.get_connection = lambda *a, **k: wrap(original(*a, **k))

    def stop(self) -> None:
        del self.pool.get_connection


def server_commands(client: Any) -> dict[str, tuple[int, int]]:
    """(calls, μs) per command, server-wide, commands run inside scripts included."""
    stats = client.info("commandstats")
    return {k.removeprefix("cmdstat_"): (int(v["calls"]), int(v["usec"])) for k, v in stats.items()}


def run(args: argparse.Namespace) -> dict[str, Any]:
    from controlplane.accounts import services as account_services
    from controlplane.audit.services import Actor
    from controlplane.billing.models import Plan
    from controlplane.core.redis_clients import async_client, sync_client
    from controlplane.limits import budgets, ratelimit, resolve
    from controlplane.limits.models import KeyLimits
    from controlplane.limits.services import budget_create

    Plan.objects.update_or_create(
        code="free",
        defaults={
            "name": "Free",
            "requests_per_minute": 10**9,
            "tokens_per_minute": 10**9,
            "requests_per_day": 10**9,
            "concurrent_fine_tuning_jobs": 1,
        },
    )
    signup = account_services.user_signup(
        email=f"bench-{os.getpid()}@bench.test",
        password="bench password 12345",
        organization_name="Bench",
        kinds=["customer"],
        actor=Actor(type="system"),
    )
    org_id, key_id = signup.organization.pk, signup.issued.api_key.pk
    KeyLimits.objects.create(
        organization_id=org_id,
        api_key=signup.issued.api_key,
        requests_per_minute=10**9 - 1,
        tokens_per_minute=10**9 - 1,
        requests_per_day=10**9 - 1,
    )
    limits = resolve.limits_for(organization_id=org_id, api_key_id=key_id)
    assert len(ratelimit.windows_for(organization_id=org_id, api_key_id=key_id, limits=limits)) == 6

    client = sync_client()  # INFO commandstats and the blocking PING baseline
    n = args.n
    results: dict[str, Any] = {"ping_sync": stats_us(timed(client.ping, n))}
    results["limits_for_cached"] = stats_us(
        timed(lambda: resolve.limits_for(organization_id=org_id, api_key_id=key_id), n)
    )

    def miss() -> object:
        resolve.limits_cache_clear()
        from controlplane.billing.plans import plan_cache_clear

        plan_cache_clear()
        return resolve.limits_for(organization_id=org_id, api_key_id=key_id)

    results["limits_for_miss"] = stats_us(timed(miss, max(200, n // 20)))
    for api_key in (None, signup.issued.api_key):
        budget_create(
            organization=signup.organization,
            api_key=api_key,
            name="bench",
            amount=Decimal(1_000_000),
            kind="hard",
            period="month",
            period_days=None,
            anchor=None,
            alert_thresholds=[],
            actor=Actor(type="system"),
        )
    budgets.budgets_for(organization_id=org_id, api_key_id=key_id)  # cached: no thread in the loop

    # The limits and budgets are async only (the serving path); one event loop, one client.
    async def asynchronous() -> None:
        aclient, _ = async_client()

        async def one_acheck() -> ratelimit.Decision:
            return await ratelimit.acheck(
                organization_id=org_id, api_key_id=key_id, tokens=300, limits=limits
            )

        # --- round trips, counted ------------------------------------------------
        await one_acheck()  # the script is loaded (SCRIPT LOAD on NOSCRIPT) outside the count
        rounds = 1000
        before = server_commands(client)
        counter = Counting(aclient.connection_pool, is_async=True)
        for _ in range(rounds):
            await one_acheck()
        client_side = counter.count / rounds
        counter.stop()
        after = server_commands(client)
        calls = {k: after[k][0] - before.get(k, (0, 0))[0] for k in after}
        evalsha_us = after.get("evalsha", (0, 0))[1] - before.get("evalsha", (0, 0))[1]
        results["round_trips"] = {
            "checks": rounds,
            "client_side_per_check": client_side,
            "server_evalsha_per_check_upper_bound": round(calls.get("evalsha", 0) / rounds, 3),
            "server_eval_or_script_load": calls.get("eval", 0) + calls.get("script|load", 0),
            # Not round trips: what Redis ran, the script's own GET/SET/TIME included.
            "server_commands_executed_per_check_upper_bound": round(
                (sum(calls.values()) - 1) / rounds,
                2,  # -1: the INFO that read `after`
            ),
            "server_us_per_evalsha": round(evalsha_us / max(1, calls.get("evalsha", 0)), 1),
        }

        # --- timed -----------------------------------------------------------------
        results["ping_async"] = stats_us(await atimed(aclient.ping, n))
        results["check_async"] = stats_us(await atimed(one_acheck, n))
        decision = await one_acheck()
        results["adjust_async"] = stats_us(
            await atimed(lambda: ratelimit.aadjust(decision, 299), n // 4)
        )
        results["limits_for_cached_async"] = stats_us(
            await atimed(lambda: resolve.alimits_for(organization_id=org_id, api_key_id=key_id), n)
        )

        # --- budgets -----------------------------------------------------------------
        held: list[budgets.Reservation] = []

        async def one_reserve() -> None:
            held.append(
                await budgets.areserve(
                    organization_id=org_id, api_key_id=key_id, max_cost=Decimal("0.002")
                )
            )

        results["reserve_async"] = stats_us(await atimed(one_reserve, n // 4))
        pending = iter(list(held))
        results["settle_async"] = stats_us(
            await atimed(lambda: budgets.asettle(next(pending), Decimal("0.001")), len(held) - 600)
        )
        counter = Counting(aclient.connection_pool, is_async=True)
        for _ in range(rounds):
            r = await budgets.areserve(
                organization_id=org_id, api_key_id=key_id, max_cost=Decimal("0.002")
            )
            await budgets.asettle(r, Decimal("0.001"))
        results["round_trips"]["budget_reserve_plus_settle"] = counter.count / rounds
        counter.stop()
        await aclient.aclose()

    asyncio.run(asynchronous())

    results["ratios"] = {
        "check_async_over_ping": round(
            results["check_async"]["median_us"] / results["ping_async"]["median_us"], 2
        ),
    }
    return results


def print_table(results: dict[str, Any]) -> None:
    rows = [
        ("PING (sync)", "ping_sync"),
        ("PING (asyncio)", "ping_async"),
        ("acheck, 6 windows (asyncio)", "check_async"),
        ("aadjust (asyncio)", "adjust_async"),
        ("limits_for, cached", "limits_for_cached"),
        ("alimits_for, cached", "limits_for_cached_async"),
        ("limits_for, miss (DB)", "limits_for_miss"),
        ("areserve, 2 budgets (asyncio)", "reserve_async"),
        ("asettle, 2 budgets (asyncio)", "settle_async"),
    ]
    print(f"{'operation':32} {'median μs':>10} {'p99 μs':>10} {'n':>7}")
    for label, name in rows:
        s = results[name]
        print(f"{label:32} {s['median_us']:>10} {s['p99_us']:>10} {s['n']:>7}")
    rt = results["round_trips"]
    print()
    print(f"round trips per acheck (client-side count): {rt['client_side_per_check']}")
    print(
        f"server EVALSHA per check (INFO commandstats, upper bound): "
        f"{rt['server_evalsha_per_check_upper_bound']}; commands Redis executed per check, "
        f"inside the script included: {rt['server_commands_executed_per_check_upper_bound']}; "
        f"Redis time per EVALSHA: {rt['server_us_per_evalsha']} μs"
    )
    print(f"round trips for reserve + settle: {rt['budget_reserve_plus_settle']}")
    r = results["ratios"]
    print(f"acheck / PING median (asyncio): {r['check_async_over_ping']}x")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(REPO / "platform"))
    prefix = f"bench-limits-{os.getpid()}"
    database_recreate(args.postgres, DB_NAME)
    try:
        setup_django(args, prefix)
        started = datetime.now(UTC)
        results = run(args)
    finally:
        import redis

        client = redis.Redis.from_url(args.redis)
        names = list(client.scan_iter(match=f"{prefix}*", count=1000))
        if names:
            client.delete(*names)
        from django.db import connections

        connections.close_all()
        database_recreate(args.postgres, DB_NAME, create=False)
    out = {
        "benchmark": "metering_limits",
        "started_at": started.isoformat(),
        "git": git_commit(),
        "machine": machine_info(),
        "n": args.n,
        "results": results,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(out, indent=2) + "\n")
    print_table(results)
    print(f"\nwrote {args.output}")
    if args.check and results["round_trips"]["client_side_per_check"] != 1:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
