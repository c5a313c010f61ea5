"""Run first by `make test`: fail at once, saying how to fix it, if PostgreSQL or Redis is down."""

from __future__ import annotations

import os
import sys
from urllib.parse import urlparse

import psycopg
import redis

DATABASE_URL = os.environ.get("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/atelier")
REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/15")

HOW_TO = {
    "PostgreSQL": (
        "Start it with: pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start\n"
        "  or point DATABASE_URL at a reachable server."
    ),
    "Redis": (
        "Start it with: redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 "
        '--save "" --appendonly no\n  or point REDIS_URL at a reachable server.'
    ),
}


def check_postgres() -> str | None:
    url = urlparse(DATABASE_URL)
    try:
        # Connect to the maintenance database: the test database may not exist yet.
        conn = psycopg.connect(
            host=url.hostname or "127.0.0.1",
            port=url.port or 5432,
            user=url.username or "postgres",
            password=url.password,
            dbname="postgres",
            connect_timeout=3,
        )
        conn.close()
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}".strip()
    return None


def check_redis() -> str | None:
    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=3).ping()
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}".strip()
    return None


def main() -> int:
    failures = {
        name: error
        for name, error in (("PostgreSQL", check_postgres()), ("Redis", check_redis()))
        if error
    }
    for name, error in failures.items():
        target = DATABASE_URL if name == "PostgreSQL" else REDIS_URL
        print(
            f"make test: {name} is unreachable at {target}\n  {error}\n  {HOW_TO[name]}",
            file=sys.stderr,
        )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
