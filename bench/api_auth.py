"""What API-key authentication and tenancy cost per request, through the real server.

    .venv/bin/python bench/api_auth.py            # ~40 s; `make bench` runs it too
    .venv/bin/python bench/api_auth.py --help     # duration, rounds, workers, client…

The script builds a throw-away PostgreSQL database, migrates it, starts the real
ASGI server with `atelier web` (uvicorn, as in production), signs up through the
public API to get a key, and then drives two DRF views through the same
middleware with the same 32 keep-alive clients:

- `GET /v1/me` with `Authorization: Bearer <key>`: key lookup, hash check,
  tenancy and scopes (the authenticated path every tenant endpoint takes);
- `GET /v1/status`, no key: the bare baseline.

Each endpoint gets a warm-up, then the measured time is split into rounds run in
ABBA order, so machine drift hits both equally. Absolute numbers depend on the
(noisy, shared) machine; the ratio between the two, measured in the same run,
is the result. It also times key verification in-process, against Django's
default password hasher for contrast. It prints a table and writes
bench/results/api_auth.json. Only loopback is used; the database is dropped and
the server stopped (by its pid) at the end.

`--metrics-ab` measures what the Prometheus instrumentation costs instead: two servers
side by side, one with METRICS_ENABLED=0 and one with METRICS_ENABLED=1 (each its own
database), driven by the same clients in ABBA rounds over both endpoints, so drift hits
both alike. It prints req/s and p50 of each and their ratio, and writes
bench/results/metrics_overhead.json (target: the metrics cost at most 3% of req/s and
0.2 ms of p50).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import json
import math
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
import timeit
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.client import HTTPConnection
from pathlib import Path
from typing import Any

import psycopg
import redis
from psycopg import sql

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # .venv/bin: where `atelier` and `uvicorn` live
HOST = "127.0.0.1"  # loopback only, by design
TARGET_RATIO = 0.8
AUTH = "auth"
UNAUTH = "unauth"
PATHS = {AUTH: "/v1/me", UNAUTH: "/v1/status"}
LABELS = {AUTH: "GET /v1/me (API key)", UNAUTH: "GET /v1/status (no auth)"}
CLK_TCK = os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------- options


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument(
        "--duration",
        type=float,
        default=10.0,
        help="measured seconds per endpoint, split over the rounds (default 10)",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=4,
        help="rounds, each running both endpoints, in ABBA order (default 4)",
    )
    p.add_argument(
        "--warmup",
        type=float,
        default=2.0,
        help="unmeasured seconds per endpoint before the rounds (default 2)",
    )
    p.add_argument("--concurrency", type=int, default=32, help="concurrent clients (default 32)")
    p.add_argument(
        "--workers",
        type=int,
        default=2,
        help="server processes, WEB_CONCURRENCY (default 2: the fastest for both endpoints "
        "on the 2-core machine, see bench/README.md)",
    )
    p.add_argument(
        "--client",
        choices=["raw", "httpx"],
        default="raw",
        help="load generator: raw asyncio HTTP/1.1 (light, default) or httpx",
    )
    p.add_argument(
        "--max-requests",
        type=int,
        default=1_000_000,
        help="cap on requests per endpoint per round (default 1,000,000)",
    )
    p.add_argument(
        "--grace",
        type=float,
        default=10.0,
        help="seconds a round may overrun before its clients are cancelled",
    )
    p.add_argument(
        "--postgres",
        default=os.environ.get("BENCH_POSTGRES_URL", "postgres://postgres@127.0.0.1:5432"),
        help="PostgreSQL server (no database part); env BENCH_POSTGRES_URL",
    )
    p.add_argument(
        "--database",
        default="atelier_bench",
        help="database to create, use and drop (default atelier_bench)",
    )
    p.add_argument(
        "--redis",
        default=os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/14"),
        help="Redis for the cache and broker; env BENCH_REDIS_URL",
    )
    p.add_argument(
        "--output",
        type=Path,
        default=REPO / "bench" / "results" / "api_auth.json",
        help="JSON results file (default bench/results/api_auth.json)",
    )
    p.add_argument(
        "--settings",
        default="controlplane.settings.local",
        help="DJANGO_SETTINGS_MODULE for the server (default controlplane.settings.local)",
    )
    p.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra environment for the server, e.g. --env DATABASE_POOL_MAX=4 (repeatable)",
    )
    p.add_argument(
        "--check",
        action="store_true",
        help=f"exit 1 unless authenticated req/s >= {TARGET_RATIO} x unauthenticated "
        "(with --metrics-ab: unless the metrics overhead is within its target)",
    )
    p.add_argument(
        "--metrics-ab",
        action="store_true",
        help="compare METRICS_ENABLED=0 and =1 (two servers, interleaved rounds) and write "
        "bench/results/metrics_overhead.json",
    )
    args = p.parse_args(argv)
    for item in args.env:
        if "=" not in item:
            p.error(f"--env takes NAME=VALUE, not {item!r}")
    if args.rounds < 1 or args.duration <= 0 or args.concurrency < 1 or args.workers < 1:
        p.error("--rounds, --duration, --concurrency and --workers must be positive")
    return args


# ---------------------------------------------------------------- CPU accounting


def machine_busy_seconds() -> float:
    """CPU seconds spent not idle, over all cores, since boot (steal excluded)."""
    with open("/proc/stat") as f:
        # user nice system idle iowait irq softirq steal …
        ticks = [int(v) for v in f.readline().split()[1:8]]
    return (sum(ticks) - ticks[3] - ticks[4]) / CLK_TCK


@dataclass
class CpuSample:
    """CPU seconds used so far by the server, this process, PostgreSQL and the machine."""

    server: float
    client: float
    machine: float
    postgres: dict[int, float]  # backends serving the bench database, by pid

    @classmethod
    def take(cls, server_pid: int, database: str) -> CpuSample:
        stats: dict[int, tuple[int, float]] = {}  # pid: (parent pid, CPU seconds)
        postgres: dict[int, float] = {}
        title = f" {database} ".encode()  # backends are titled "postgres: USER DB HOST …"
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            pid = int(entry)
            with contextlib.suppress(OSError, ValueError, IndexError):
                with open(f"/proc/{pid}/stat") as f:
                    raw = f.read()
                comm, _, rest = raw.partition("(")[2].rpartition(")")
                fields = rest.split()
                cpu = (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime
                stats[pid] = (int(fields[1]), cpu)
                if comm == "postgres" and title in Path(f"/proc/{pid}/cmdline").read_bytes():
                    postgres[pid] = cpu
        server = 0.0
        for pid, (_, cpu) in stats.items():  # the server and uvicorn's worker processes
            p = pid
            while p > 1 and p != server_pid:
                p = stats.get(p, (0, 0.0))[0]
            if p == server_pid:
                server += cpu
        return cls(server, time.process_time(), machine_busy_seconds(), postgres)

    def postgres_since(self, before: CpuSample) -> float:
        return sum(cpu - before.postgres.get(pid, 0.0) for pid, cpu in self.postgres.items())


# ---------------------------------------------------------------- setup


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def database_recreate(postgres: str, name: str, *, create: bool = True) -> None:
    with psycopg.connect(f"{postgres}/postgres", autocommit=True, connect_timeout=5) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )
        if create:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))


def redis_forget(url: str, prefix: str) -> None:
    with contextlib.suppress(redis.RedisError):
        client = redis.Redis.from_url(url, socket_connect_timeout=3)
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        if keys:
            client.delete(*keys)


def server_env(args: argparse.Namespace, data_dir: str, port: int, prefix: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",  # `atelier web` execs `uvicorn`
            "DJANGO_SETTINGS_MODULE": args.settings,
            "DATABASE_URL": f"{args.postgres}/{args.database}",
            "REDIS_URL": args.redis,
            "CACHE_KEY_PREFIX": prefix,  # our own throttle counters: sign-up is never refused
            "SIGNUP_THROTTLE_RATE": "1000/hour",
            "DEBUG": "false",
            "LOG_LEVEL": "WARNING",  # one JSON line per request would measure the terminal
            "ATELIER_DATA_DIR": data_dir,
            "HOST": HOST,
            "PORT": str(port),
            "WEB_CONCURRENCY": str(args.workers),
        }
    )
    env.update(item.split("=", 1) for item in args.env)
    return env


def http_json(
    port: int,
    method: str,
    path: str,
    body: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, Any]]:
    conn = HTTPConnection(HOST, port, timeout=30)
    try:
        payload = json.dumps(body).encode() if body is not None else None
        conn.request(
            method,
            path,
            body=payload,
            headers={"Content-Type": "application/json", **(headers or {})},
        )
        response = conn.getresponse()
        raw = response.read()
        try:
            data = json.loads(raw) if raw else {}
        except ValueError:
            data = {"raw": raw[:500].decode(errors="replace")}
        return response.status, data
    finally:
        conn.close()


def wait_healthy(
    port: int, server: subprocess.Popen[bytes], log_path: Path, timeout: float = 60.0
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"server exited with {server.returncode}:\n{tail(log_path)}")
        with contextlib.suppress(OSError):
            if http_json(port, "GET", "/healthz")[0] == 200:
                return
        time.sleep(0.1)
    raise SystemExit(f"server did not answer /healthz within {timeout:.0f}s:\n{tail(log_path)}")


def tail(path: Path, lines: int = 40) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return "(no server log)"


def sign_up(port: int) -> str:
    status, data = http_json(
        port,
        "POST",
        "/v1/signup",
        {
            "email": f"bench-{uuid.uuid4().hex[:12]}@example.com",
            "password": "correct horse battery staple 42",
            "organization_name": "Bench Inc",
        },
    )
    if status != 201:
        raise SystemExit(f"POST /v1/signup answered {status}: {data}")
    key = str(data["api_key"]["value"])
    status, me = http_json(port, "GET", PATHS[AUTH], headers={"Authorization": f"Bearer {key}"})
    if status != 200 or me.get("object") != "me":
        raise SystemExit(f"GET /v1/me with the new key answered {status}: {me}")
    status, ok = http_json(port, "GET", PATHS[UNAUTH])
    if status != 200 or ok.get("status") != "ok":
        raise SystemExit(f"GET /v1/status answered {status}: {ok}")
    return key


@contextlib.contextmanager
def running_server(args: argparse.Namespace) -> Iterator[tuple[int, int, Path]]:
    """A migrated database and a started `atelier web`; both gone afterwards."""
    prefix = f"atelier-bench-{args.database}-{os.getpid()}-{int(time.time())}"
    with tempfile.TemporaryDirectory(prefix="atelier-bench-") as data_dir:
        log_path = Path(data_dir) / "server.log"
        port = free_port()
        env = server_env(args, data_dir, port, prefix)
        database_recreate(args.postgres, args.database)
        server: subprocess.Popen[bytes] | None = None
        try:
            migrate = subprocess.run(
                [str(BIN / "atelier"), "manage", "migrate", "--noinput"],
                env=env,
                cwd=REPO,
                capture_output=True,
                text=True,
                timeout=300,
                check=False,
            )
            if migrate.returncode != 0:
                raise SystemExit(f"migrate failed:\n{migrate.stdout}\n{migrate.stderr}")
            with open(log_path, "wb") as log:
                server = subprocess.Popen(
                    [str(BIN / "atelier"), "web"],
                    env=env,
                    cwd=REPO,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,  # its own process group: uvicorn's workers too
                )
            wait_healthy(port, server, log_path)
            yield port, server.pid, log_path
        finally:
            if server is not None:
                stop_server(server)
            with contextlib.suppress(psycopg.Error):
                database_recreate(args.postgres, args.database, create=False)
            redis_forget(args.redis, prefix)


def stop_server(server: subprocess.Popen[bytes]) -> None:
    if server.poll() is None:
        server.send_signal(signal.SIGTERM)  # uvicorn's master forwards it to its workers
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.pid, signal.SIGKILL)  # the group we created, nothing else
            server.wait(timeout=10)


# ---------------------------------------------------------------- load generator


class ConnectionLost(Exception):
    pass


class RawClient:
    """HTTP/1.1 GET over one keep-alive connection: the least client CPU per request."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def get(self, request: bytes) -> int:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(HOST, self.port)
            sock = self.writer.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        assert self.reader is not None
        try:
            self.writer.write(request)
            head = await self.reader.readuntil(b"\r\n\r\n")
            status = int(head[9:12])
            length, chunked, close = -1, False, False
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    length = int(value)
                elif name == b"transfer-encoding":
                    chunked = b"chunked" in value.lower()
                elif name == b"connection":
                    close = b"close" in value.lower()
            if chunked:
                await self._skip_chunked()
            elif length >= 0:
                await self.reader.readexactly(length)
            else:
                await self.reader.read()
                close = True
        except (OSError, ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
            self.close()
            raise ConnectionLost(type(exc).__name__) from exc
        if close:
            self.close()
        return status

    async def _skip_chunked(self) -> None:
        assert self.reader is not None
        while True:
            size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                while await self.reader.readuntil(b"\r\n") != b"\r\n":
                    pass
                return
            await self.reader.readexactly(size + 2)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


@dataclass
class Segment:
    """One endpoint for one stretch of time."""

    endpoint: str
    ok: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    elapsed: float = 0.0
    server_cpu: float = 0.0
    client_cpu: float = 0.0
    machine_cpu: float = 0.0
    postgres_cpu: float = 0.0

    @property
    def rps(self) -> float:
        return self.ok / self.elapsed if self.elapsed else 0.0


class Load:
    def __init__(self, args: argparse.Namespace, port: int, key: str, server_pid: int) -> None:
        self.args = args
        self.server_pid = server_pid
        self.headers = {AUTH: {"Authorization": f"Bearer {key}"}, UNAUTH: {}}
        base = f"Host: {HOST}:{port}\r\nAccept: application/json\r\nUser-Agent: atelier-bench\r\n"
        self.raw_requests = {
            name: (
                f"GET {PATHS[name]} HTTP/1.1\r\n{base}"
                + "".join(f"{k}: {v}\r\n" for k, v in self.headers[name].items())
                + "\r\n"
            ).encode()
            for name in PATHS
        }
        self.port = port
        self.raw = [RawClient(port) for _ in range(args.concurrency)]
        self.httpx: Any = None

    async def __aenter__(self) -> Load:
        if self.args.client == "httpx":
            import httpx

            n = self.args.concurrency
            self.httpx = httpx.AsyncClient(
                base_url=f"http://{HOST}:{self.port}",
                timeout=30.0,
                limits=httpx.Limits(max_connections=n, max_keepalive_connections=n),
            )
        return self

    async def __aexit__(self, *exc: object) -> None:
        for client in self.raw:
            client.close()
        if self.httpx is not None:
            await self.httpx.aclose()

    async def _get(self, index: int, endpoint: str) -> int:
        if self.httpx is not None:
            response = await self.httpx.get(PATHS[endpoint], headers=self.headers[endpoint])
            return int(response.status_code)
        return await self.raw[index].get(self.raw_requests[endpoint])

    async def _client(self, index: int, seg: Segment, deadline: float, cap: list[int]) -> None:
        perf = time.perf_counter
        while perf() < deadline and cap[0] > 0:
            cap[0] -= 1
            started = perf()
            try:
                status = await self._get(index, seg.endpoint)
            except Exception as exc:  # every failure is counted, none stops the run
                kind = type(exc).__name__
                seg.errors[f"{kind} ({exc})" if isinstance(exc, ConnectionLost) else kind] += 1
                continue
            if status == 200:
                seg.latencies.append(perf() - started)
                seg.ok += 1
            else:
                seg.errors[f"HTTP {status}"] += 1

    async def run(self, endpoint: str, seconds: float) -> Segment:
        seg = Segment(endpoint)
        cap = [self.args.max_requests]
        before = CpuSample.take(self.server_pid, self.args.database)
        started = time.perf_counter()
        tasks = [
            asyncio.create_task(self._client(i, seg, started + seconds, cap))
            for i in range(self.args.concurrency)
        ]
        _, pending = await asyncio.wait(tasks, timeout=seconds + self.args.grace)
        for task in pending:  # a hung request: count it, drop its connection
            task.cancel()
            seg.errors["timeout"] += 1
        if pending:
            await asyncio.wait(pending)
            for client in self.raw:
                client.close()
        seg.elapsed = time.perf_counter() - started
        after = CpuSample.take(self.server_pid, self.args.database)
        seg.server_cpu = after.server - before.server
        seg.client_cpu = after.client - before.client
        seg.machine_cpu = after.machine - before.machine
        seg.postgres_cpu = after.postgres_since(before)
        return seg


async def drive(args: argparse.Namespace, port: int, key: str, server_pid: int) -> list[Segment]:
    per_round = args.duration / args.rounds
    segments: list[Segment] = []
    async with Load(args, port, key, server_pid) as load:
        for endpoint in (UNAUTH, AUTH):
            warm = await load.run(endpoint, args.warmup)
            print(f"  warm-up {LABELS[endpoint]:<26} {warm.rps:8.1f} req/s", flush=True)
        for r in range(args.rounds):
            order = (AUTH, UNAUTH) if r % 2 == 0 else (UNAUTH, AUTH)  # ABBA: cancels drift
            for endpoint in order:
                seg = await load.run(endpoint, per_round)
                segments.append(seg)
                print(
                    f"  round {r + 1}/{args.rounds} {LABELS[endpoint]:<26} {seg.rps:8.1f} req/s"
                    f"{'  errors: ' + str(dict(seg.errors)) if seg.errors else ''}",
                    flush=True,
                )
    return segments


def event_loop_factory() -> tuple[Callable[[], asyncio.AbstractEventLoop] | None, str]:
    try:
        import uvloop  # uvicorn[standard] brings it; the server uses it too
    except ImportError:
        return None, "asyncio"
    return uvloop.new_event_loop, "uvloop"


# ---------------------------------------------------------------- key verification


def time_call(fn: Callable[[], object]) -> float:
    """Best per-call seconds over repeats of a loop that runs at least 0.2 s."""
    timer = timeit.Timer(fn)
    number, _ = timer.autorange()
    return min(timer.repeat(repeat=5 if number > 1 else 3, number=number)) / number


def verification_costs() -> dict[str, Any]:
    """In-process: the hot-path key check against Django's default password hasher."""
    from django.conf import settings

    if not settings.configured:
        settings.configure()  # Django's defaults: PBKDF2 first in PASSWORD_HASHERS
    from django.contrib.auth.hashers import PBKDF2PasswordHasher, check_password, make_password

    from controlplane.accounts import keys

    new = keys.generate()
    pbkdf2 = make_password(new.key)
    assert keys.verify(new.key, new.hashed)
    assert check_password(new.key, pbkdf2)
    verify_s = time_call(lambda: keys.verify(new.key, new.hashed))
    parse_s = time_call(lambda: keys.parse_prefix(new.key))
    pbkdf2_s = time_call(lambda: check_password(new.key, pbkdf2))
    return {
        "api_key_hash": new.hashed.split("$", 1)[0],
        "keys_verify_us": round(verify_s * 1e6, 2),
        "keys_parse_prefix_us": round(parse_s * 1e6, 2),
        "django_default_hasher": f"pbkdf2_sha256, {PBKDF2PasswordHasher.iterations} iterations",
        "django_check_password_ms": round(pbkdf2_s * 1e3, 1),
        "slowdown_if_pbkdf2": round(pbkdf2_s / verify_s),
    }


# ---------------------------------------------------------------- report


def percentile(sorted_values: list[float], p: float) -> float:
    if not sorted_values:
        return math.nan
    return sorted_values[max(0, math.ceil(p / 100 * len(sorted_values)) - 1)]


def summarize(segments: list[Segment], endpoint: str) -> dict[str, Any]:
    mine = [s for s in segments if s.endpoint == endpoint]
    ok = sum(s.ok for s in mine)
    elapsed = sum(s.elapsed for s in mine)
    latencies = sorted(x for s in mine for x in s.latencies)
    errors: Counter[str] = Counter()
    for s in mine:
        errors.update(s.errors)
    server, client, machine, postgres = (
        sum(getattr(s, a) for s in mine)
        for a in ("server_cpu", "client_cpu", "machine_cpu", "postgres_cpu")
    )

    def per_req_us(seconds: float) -> float:
        return round(seconds / ok * 1e6, 1) if ok else math.nan

    return {
        "path": PATHS[endpoint],
        "requests_ok": ok,
        "errors": sum(errors.values()),
        "error_kinds": dict(errors),
        "seconds": round(elapsed, 3),
        "req_per_s": round(ok / elapsed, 1) if elapsed else 0.0,
        "req_per_s_by_round": [round(s.rps, 1) for s in mine],
        "p50_ms": round(percentile(latencies, 50) * 1e3, 2),
        "p90_ms": round(percentile(latencies, 90) * 1e3, 2),
        "p99_ms": round(percentile(latencies, 99) * 1e3, 2),
        "max_ms": round(latencies[-1] * 1e3, 2) if latencies else math.nan,
        "server_cpu_us_per_req": per_req_us(server),
        "client_cpu_us_per_req": per_req_us(client),
        # Busy CPU outside the server, this process and PostgreSQL: Redis, kernel, neighbours.
        "postgres_cpu_us_per_req": per_req_us(postgres),
        "other_cpu_us_per_req": per_req_us(max(0.0, machine - server - client - postgres)),
        "machine_busy_cores": round(machine / elapsed, 2) if elapsed else 0.0,
    }


def git_commit() -> dict[str, Any]:
    def git(*a: str) -> str:
        out = subprocess.run(
            ["git", "-C", str(REPO), *a], capture_output=True, text=True, check=False
        )
        return out.stdout.strip()

    return {"commit": git("rev-parse", "HEAD") or None, "dirty": bool(git("status", "--porcelain"))}


def machine_info() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    versions = {}
    for dist in (
        "django",
        "djangorestframework",
        "uvicorn",
        "uvloop",
        "httptools",
        "psycopg",
        "httpx",
    ):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[dist] = importlib.metadata.version(dist)
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "versions": versions,
    }


def print_table(results: dict[str, Any]) -> None:
    cols = (
        "endpoint",
        "req/s",
        "p50 ms",
        "p99 ms",
        "errors",
        "server CPU us/req",
        "PostgreSQL CPU us/req",
    )
    rows = [
        (
            LABELS[e],
            f"{r['req_per_s']:.1f}",
            f"{r['p50_ms']:.2f}",
            f"{r['p99_ms']:.2f}",
            str(r["errors"]),
            f"{r['server_cpu_us_per_req']:.0f}",
            f"{r['postgres_cpu_us_per_req']:.0f}",
        )
        for e, r in ((UNAUTH, results["endpoints"][UNAUTH]), (AUTH, results["endpoints"][AUTH]))
    ]
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(cols)]
    line = "  ".join(f"{{:{'<' if i == 0 else '>'}{w}}}" for i, w in enumerate(widths))
    print()
    print(line.format(*cols))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print(line.format(*row))
    c = results["comparison"]
    v = results["key_verification"]
    print()
    print(
        f"auth/unauth req/s: {c['ratio_req_per_s']:.3f} (rounds: "
        f"{', '.join(f'{x:.3f}' for x in c['ratio_by_round'])})   "
        f"target >= {TARGET_RATIO}: {'MET' if c['target_met'] else 'NOT MET'}"
    )
    print(
        f"p50 overhead: {c['p50_overhead_ms']:+.2f} ms; server CPU per request: "
        f"{c['server_cpu_overhead_us_per_req']:+.0f} us, PostgreSQL: "
        f"{c['postgres_cpu_overhead_us_per_req']:+.0f} us"
    )
    print(
        f"key check in-process: parse_prefix {v['keys_parse_prefix_us']:.1f} us + "
        f"keys.verify ({v['api_key_hash']}) {v['keys_verify_us']:.1f} us; "
        f"Django's check_password ({v['django_default_hasher']}) "
        f"{v['django_check_password_ms']:.0f} ms, {v['slowdown_if_pbkdf2']:,}x slower"
    )
    s = results["settings"]
    print(
        f"settings: {s['concurrency']} clients ({s['client']}, {s['client_loop']}), "
        f"WEB_CONCURRENCY={s['workers']}, {s['duration_s']:g} s per endpoint in "
        f"{s['rounds']} rounds, {results['machine']['cpus']} CPUs"
    )


# ---------------------------------------------------------------- metrics on and off

OFF, ON = "metrics_off", "metrics_on"
METRICS_TARGET = {"max_req_per_s_loss": 0.03, "max_p50_overhead_ms": 0.2}


def variant_args(args: argparse.Namespace, variant: str) -> argparse.Namespace:
    """The server options of one side: its own database, METRICS_ENABLED set."""
    env = [e for e in args.env if not e.startswith("METRICS_ENABLED=")]
    on = variant == ON
    return argparse.Namespace(
        **{
            **vars(args),
            "database": f"{args.database}_{'on' if on else 'off'}",
            "env": [*env, f"METRICS_ENABLED={'1' if on else '0'}"],
        }
    )


async def drive_ab(
    args: argparse.Namespace, servers: dict[str, tuple[int, str, int]]
) -> dict[str, list[Segment]]:
    """Both endpoints on both servers, warmed up, then rounds in ABBA order of the servers."""
    per_round = args.duration / args.rounds
    segments: dict[str, list[Segment]] = {OFF: [], ON: []}
    loads = {v: Load(args, port, key, pid) for v, (port, key, pid) in servers.items()}
    async with loads[OFF], loads[ON]:
        for variant in (OFF, ON):
            for endpoint in (UNAUTH, AUTH):
                warm = await loads[variant].run(endpoint, args.warmup)
                print(f"  warm-up {variant:<11} {LABELS[endpoint]:<26} {warm.rps:8.1f} req/s")
        # uvicorn closes a keep-alive connection idle for 5 s: both sides' clients have
        # just been used when the rounds begin (neither pays for reconnecting in round 1).
        for variant in (OFF, ON):
            await loads[variant].run(UNAUTH, 0.2)
        for r in range(args.rounds):
            order = (ON, OFF) if r % 2 == 0 else (OFF, ON)
            for endpoint in (UNAUTH, AUTH) if r % 2 == 0 else (AUTH, UNAUTH):
                for variant in order:
                    seg = await loads[variant].run(endpoint, per_round)
                    segments[variant].append(seg)
                    print(
                        f"  round {r + 1}/{args.rounds} {variant:<11} {LABELS[endpoint]:<26} "
                        f"{seg.rps:8.1f} req/s"
                        f"{'  errors: ' + str(dict(seg.errors)) if seg.errors else ''}",
                        flush=True,
                    )
    return segments


def metrics_ab(args: argparse.Namespace) -> int:
    loop_factory, loop_name = event_loop_factory()
    info = machine_info()
    started = datetime.now(UTC)
    print(
        f"atelier metrics overhead bench: {args.concurrency} clients, "
        f"WEB_CONCURRENCY={args.workers}, client={args.client} ({loop_name})",
        flush=True,
    )
    output = args.output
    if output == REPO / "bench" / "results" / "api_auth.json":
        output = REPO / "bench" / "results" / "metrics_overhead.json"
    with contextlib.ExitStack() as stack:
        servers: dict[str, tuple[int, str, int]] = {}
        logs: dict[str, Path] = {}
        # Started metrics-on first: the first server up gets no head start in the page cache.
        for variant in (ON, OFF):
            port, pid, log_path = stack.enter_context(running_server(variant_args(args, variant)))
            servers[variant] = (port, sign_up(port), pid)
            logs[variant] = log_path
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            segments = runner.run(drive_ab(args, servers))
        for variant, log_path in logs.items():
            if any(s.errors for s in segments[variant]):
                print(f"{variant} server log (tail):\n{tail(log_path)}", file=sys.stderr)
    sides = {v: {e: summarize(segments[v], e) for e in (UNAUTH, AUTH)} for v in (OFF, ON)}
    comparison: dict[str, Any] = {}
    met = True
    for endpoint in (UNAUTH, AUTH):
        off, on = sides[OFF][endpoint], sides[ON][endpoint]
        ratio = on["req_per_s"] / off["req_per_s"] if off["req_per_s"] else 0.0
        p50 = round(on["p50_ms"] - off["p50_ms"], 3)
        ok = (
            ratio >= 1 - METRICS_TARGET["max_req_per_s_loss"]
            and p50 <= METRICS_TARGET["max_p50_overhead_ms"]
        )
        met = met and ok
        comparison[endpoint] = {
            "path": PATHS[endpoint],
            "ratio_req_per_s_on_over_off": round(ratio, 4),
            "ratio_by_round": [
                round(a.rps / b.rps, 3)
                for a, b in zip(
                    [s for s in segments[ON] if s.endpoint == endpoint],
                    [s for s in segments[OFF] if s.endpoint == endpoint],
                    strict=True,
                )
                if b.rps
            ],
            "p50_overhead_ms": p50,
            "server_cpu_overhead_us_per_req": round(
                on["server_cpu_us_per_req"] - off["server_cpu_us_per_req"], 1
            ),
            # The steadier measure on a shared machine: what the metrics add to the
            # server's CPU per request (req/s at saturation moves by about as much).
            "server_cpu_overhead_share": round(
                on["server_cpu_us_per_req"] / off["server_cpu_us_per_req"] - 1, 4
            )
            if off["server_cpu_us_per_req"]
            else None,
            "target_met": ok,
        }
    results: dict[str, Any] = {
        "benchmark": "metrics_overhead",
        "date": started.isoformat(timespec="seconds"),
        "git": git_commit(),
        "machine": info,
        "settings": {
            "concurrency": args.concurrency,
            "workers": args.workers,
            "client": args.client,
            "client_loop": loop_name,
            "duration_s_per_endpoint_and_side": args.duration,
            "rounds": args.rounds,
            "warmup_s": args.warmup,
            "round_order": "ABBA of the two servers (metrics on first in odd rounds)",
            "server": "two `atelier web` (uvicorn) side by side, DEBUG=false, "
            "LOG_LEVEL=WARNING, PostgreSQL + Redis on loopback; only METRICS_ENABLED differs",
            "extra_server_env": sorted(args.env),
        },
        "target": METRICS_TARGET,
        "sides": sides,
        "comparison": comparison,
        "target_met": met,
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2) + "\n")
    print()
    print(
        f"{'endpoint':<26}  {'off req/s':>10}  {'on req/s':>10}  {'on/off':>7}  "
        f"{'off p50':>8}  {'on p50':>8}  {'p50 +ms':>8}  {'CPU/req':>8}"
    )
    for endpoint in (UNAUTH, AUTH):
        off, on, c = sides[OFF][endpoint], sides[ON][endpoint], comparison[endpoint]
        print(
            f"{LABELS[endpoint]:<26}  {off['req_per_s']:>10.1f}  {on['req_per_s']:>10.1f}  "
            f"{c['ratio_req_per_s_on_over_off']:>7.3f}  {off['p50_ms']:>8.2f}  "
            f"{on['p50_ms']:>8.2f}  {c['p50_overhead_ms']:>+8.2f}  "
            f"{(c['server_cpu_overhead_share'] or 0) * 100:>+7.1f}%"
        )
    print(
        f"target: on/off >= {1 - METRICS_TARGET['max_req_per_s_loss']:.2f} and p50 "
        f"+{METRICS_TARGET['max_p50_overhead_ms']} ms at most: {'MET' if met else 'NOT MET'}"
    )
    shown = output.relative_to(REPO) if output.is_relative_to(REPO) else output
    print(f"wrote {shown}")
    if any(s["errors"] for side in sides.values() for s in side.values()):
        print("FAILED: some requests did not answer 200", file=sys.stderr)
        return 1
    return 1 if args.check and not met else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.metrics_ab:
        return metrics_ab(args)
    loop_factory, loop_name = event_loop_factory()
    info = machine_info()
    started = datetime.now(UTC)
    print(
        f"atelier api_auth bench: {args.concurrency} clients, WEB_CONCURRENCY={args.workers}, "
        f"client={args.client} ({loop_name})",
        flush=True,
    )
    with running_server(args) as (port, server_pid, log_path):
        key = sign_up(port)
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            segments = runner.run(drive(args, port, key, server_pid))
        if any(s.errors for s in segments):
            print(f"server log (tail):\n{tail(log_path)}", file=sys.stderr)
    verification = verification_costs()

    endpoints = {e: summarize(segments, e) for e in (UNAUTH, AUTH)}
    a, u = endpoints[AUTH], endpoints[UNAUTH]
    by_round = [
        round(sa.rps / su.rps, 3)
        for sa, su in zip(
            [s for s in segments if s.endpoint == AUTH],
            [s for s in segments if s.endpoint == UNAUTH],
            strict=True,
        )
        if su.rps
    ]
    ratio = a["req_per_s"] / u["req_per_s"] if u["req_per_s"] else 0.0
    results: dict[str, Any] = {
        "benchmark": "api_auth",
        "date": started.isoformat(timespec="seconds"),
        "git": git_commit(),
        "machine": info,
        "settings": {
            "concurrency": args.concurrency,
            "workers": args.workers,
            "client": args.client,
            "client_loop": loop_name,
            "duration_s": args.duration,
            "rounds": args.rounds,
            "warmup_s": args.warmup,
            "round_order": "ABBA (auth first in odd rounds)",
            "server": "atelier web (uvicorn), DEBUG=false, LOG_LEVEL=WARNING, "
            "PostgreSQL + Redis on loopback",
            "django_settings_module": args.settings,
            "extra_server_env": sorted(args.env),
        },
        "endpoints": endpoints,
        "comparison": {
            "ratio_req_per_s": round(ratio, 3),
            "ratio_by_round": by_round,
            "target_ratio": TARGET_RATIO,
            "target_met": ratio >= TARGET_RATIO,
            "p50_overhead_ms": round(a["p50_ms"] - u["p50_ms"], 2),
            "p99_overhead_ms": round(a["p99_ms"] - u["p99_ms"], 2),
            "server_cpu_overhead_us_per_req": round(
                a["server_cpu_us_per_req"] - u["server_cpu_us_per_req"], 1
            ),
            "postgres_cpu_overhead_us_per_req": round(
                a["postgres_cpu_us_per_req"] - u["postgres_cpu_us_per_req"], 1
            ),
        },
        "key_verification": verification,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print_table(results)
    shown = args.output.relative_to(REPO) if args.output.is_relative_to(REPO) else args.output
    print(f"wrote {shown}")
    if a["errors"] or u["errors"]:
        print("FAILED: some requests did not answer 200", file=sys.stderr)
        return 1
    if args.check and not results["comparison"]["target_met"]:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
