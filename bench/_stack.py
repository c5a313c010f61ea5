"""The real stack for the end-to-end benchmarks: a throw-away database, `atelier web`,
`atelier worker control` and (optionally) `atelier worker gpu` as subprocesses, and
/proc readings of the processes they become.

Shared by `ingest.py` and `train.py`; the start-up pieces they share with
`api_auth.py` (server environment, database, health check, stopping by pid) come
from there. Everything started here is stopped by its own pid (SIGKILL only to the
process group it was started in); the database is dropped and the Redis keys that
appeared during the run are deleted, also on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import redis
from api_auth import (
    BIN,
    REPO,
    database_recreate,
    free_port,
    server_env,
    stop_server,
    tail,
    wait_healthy,
)

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024

# ---------------------------------------------------------------- /proc


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM in KiB (empty once the process is gone)."""
    values = {}
    with contextlib.suppress(OSError), open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                values[line[:5]] = int(line.split()[1])
    return values


def rss_kb(pid: int) -> int:
    with contextlib.suppress(OSError, ValueError, IndexError), open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * PAGE_KB
    return 0


def cpu_seconds(pid: int) -> float:
    with contextlib.suppress(OSError, ValueError, IndexError):
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime
    return 0.0


def children(pid: int) -> list[int]:
    found: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                found += [
                    int(c) for c in Path(f"/proc/{pid}/task/{task}/children").read_text().split()
                ]
    return found


def process_tree(root: int) -> list[int]:
    tree, queue = [], [root]
    while queue:
        pid = queue.pop()
        tree.append(pid)
        queue += children(pid)
    return tree


def tree_cpu(root: int) -> float:
    return sum(cpu_seconds(pid) for pid in process_tree(root))


def steal_seconds() -> float:
    """CPU time the hypervisor gave to someone else, all cores, since boot: a noisy
    neighbour shows up here."""
    with open("/proc/stat") as f:
        return int(f.readline().split()[8]) / CLK_TCK


# ---------------------------------------------------------------- Redis


def redis_keys(url: str) -> set[bytes]:
    with contextlib.suppress(redis.RedisError):
        client = redis.Redis.from_url(url, socket_connect_timeout=3)
        return set(client.scan_iter(count=1000))
    return set()


def redis_pid(url: str) -> int | None:
    """The Redis server's process id, when it runs on this machine (for its CPU time)."""
    with contextlib.suppress(redis.RedisError, KeyError, ValueError):
        client = redis.Redis.from_url(url, socket_connect_timeout=3)
        pid = int(client.info("server")["process_id"])
        if Path(f"/proc/{pid}").exists():
            return pid
    return None


def redis_delete_new(url: str, before: set[bytes]) -> int:
    """Delete the keys that appeared in our Redis db since `before` (cache, broker, results)."""
    with contextlib.suppress(redis.RedisError):
        client = redis.Redis.from_url(url, socket_connect_timeout=3)
        new = [k for k in client.scan_iter(count=1000) if k not in before]
        if new:
            client.delete(*new)
        return len(new)
    return 0


# ---------------------------------------------------------------- database and processes


def manage(env: dict[str, str], *argv: str, timeout: float = 300) -> str:
    """`atelier manage ARGS…` against the bench database; its output, or SystemExit."""
    done = subprocess.run(
        [str(BIN / "atelier"), "manage", *argv],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"atelier manage {' '.join(argv)} failed:\n{done.stdout}\n{done.stderr}")
    return done.stdout


@contextlib.contextmanager
def platform_database(
    args: argparse.Namespace,
    data_dir: Path,
    *,
    name: str,
    extra_env: dict[str, str] | None = None,
) -> Iterator[dict[str, str]]:
    """A migrated throw-away database (`args.database` on `args.postgres`); yields the
    environment the server and the workers share. `args` also gives `redis`,
    `settings`, `workers` and `env` (NAME=VALUE items, applied last)."""
    prefix = f"atelier-bench-{name}-{os.getpid()}-{int(time.time())}"
    env = server_env(args, str(data_dir), 0, prefix)
    env.update({"PYTHONUNBUFFERED": "1", **(extra_env or {})})
    env.update(item.split("=", 1) for item in args.env)
    keys_before = redis_keys(args.redis)
    if keys_before:
        print(f"  note: Redis {args.redis} already holds {len(keys_before)} keys; they are kept")
    database_recreate(args.postgres, args.database)
    try:
        manage(env, "migrate", "--noinput")
        yield env
    finally:
        with contextlib.suppress(Exception):
            database_recreate(args.postgres, args.database, create=False)
        redis_delete_new(args.redis, keys_before)


@contextlib.contextmanager
def private_servers(args: argparse.Namespace, tmpdir: Path | None = None) -> Iterator[None]:
    """With `args.private_servers`: the PostgreSQL and Redis that `make run` starts when
    nothing is configured (controlplane.devservers, from the `run` extra's wheels), in
    a throw-away data directory; `args.postgres` and `args.redis` then name them. The
    run reports which servers it measured (`args.servers`)."""
    if not getattr(args, "private_servers", False):
        args.servers = "system"
        yield
        return
    from controlplane import devservers

    with (
        tempfile.TemporaryDirectory(prefix="atelier-bench-private-", dir=tmpdir) as data,
        devservers.running(Path(data), {}) as servers,
    ):
        args.postgres = servers.env["DATABASE_URL"].rsplit("/", 1)[0]
        args.redis = servers.env["REDIS_URL"]
        args.servers = "private (make run)"
        print(f"  private servers: PostgreSQL and Redis under {data}", flush=True)
        yield


@dataclass
class Stack:
    """The server and the workers started for a measurement, and where they log."""

    port: int
    web: subprocess.Popen[bytes]
    worker: subprocess.Popen[bytes]  # `atelier worker control`
    log_dir: Path
    gpu: subprocess.Popen[bytes] | None = None  # `atelier worker gpu`, when asked for


@contextlib.contextmanager
def started_stack(
    env: dict[str, str], log_dir: Path, *, gpu: bool = False, gpu_env: dict[str, str] | None = None
) -> Iterator[Stack]:
    """`atelier web` and `atelier worker control` (and `atelier worker gpu` with `gpu`),
    each answering before this yields; stopped by their pid afterwards. The workers
    log at INFO (Celery's task lines carry their run times); logs in `log_dir`."""
    port = free_port()
    env = {**env, "PORT": str(port)}
    log_dir.mkdir(parents=True, exist_ok=True)
    procs: list[subprocess.Popen[bytes]] = []
    worker_env = {**env, "LOG_LEVEL": "INFO"}
    commands = [("web", ["web"], env), ("worker", ["worker", "control"], worker_env)]
    if gpu:
        commands.append(("gpu", ["worker", "gpu"], {**worker_env, **(gpu_env or {})}))
    try:
        for name, argv, penv in commands:
            with open(log_dir / f"{name}.log", "wb") as log:
                procs.append(
                    subprocess.Popen(
                        [str(BIN / "atelier"), *argv],
                        env=penv,
                        cwd=REPO,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        stdin=subprocess.DEVNULL,
                        start_new_session=True,  # its own group: the pool children too
                    )
                )
        web, worker = procs[0], procs[1]
        wait_healthy(port, web, log_dir / "web.log")
        wait_worker(env["REDIS_URL"], worker, log_dir / "worker.log")
        gpu_worker = procs[2] if gpu else None
        if gpu_worker is not None:
            from jobcontracts import queues

            wait_worker(
                env["REDIS_URL"],
                gpu_worker,
                log_dir / "gpu.log",
                task=queues.GPU_PING,
                queue=queues.GPU_TRAINING,
            )
        yield Stack(port, web, worker, log_dir, gpu_worker)
    finally:
        for process in reversed(procs):
            stop_server(process)  # SIGTERM to the pid; SIGKILL to its own group if it hangs


def wait_worker(
    broker: str,
    worker: subprocess.Popen[bytes],
    log_path: Path,
    timeout: float = 90.0,
    *,
    task: str | None = None,
    queue: str | None = None,
) -> None:
    """Until the worker answers a ping task through the queue (default: the control
    worker's `controlplane.ping` on `control`)."""
    from celery import Celery

    from jobcontracts import queues

    deadline = time.monotonic() + timeout
    with Celery("atelier-bench", broker=broker, backend=broker) as app:
        result = app.send_task(task or queues.CONTROL_PING, queue=queue or queues.CONTROL)
        while time.monotonic() < deadline:
            if worker.poll() is not None:
                raise SystemExit(f"worker exited with {worker.returncode}:\n{tail(log_path)}")
            with contextlib.suppress(Exception):
                answer = result.get(timeout=1.0)
                if isinstance(answer, dict) and answer.get("ok") is True:
                    result.forget()
                    return
    raise SystemExit(f"worker did not answer a ping within {timeout:.0f}s:\n{tail(log_path)}")
