"""`atelier`: the one entry point for every process the platform runs.

`make run` (through deploy/Procfile), docker-compose and the Kubernetes
manifests all start processes with these same commands, so what runs on a
laptop is what runs in production. Each command reads its configuration from
the environment and replaces itself with the real server (exec), so signals
(Ctrl-C, SIGTERM) reach uvicorn or Celery directly.

    atelier web              # ASGI server (uvicorn): HOST, PORT, WEB_CONCURRENCY; /metrics
    atelier worker control   # Celery worker for queue `control` (Django side)
    atelier worker gpu       # Celery worker for gpu.training, gpu.compression (no Django)
    atelier worker inference # Celery worker for gpu.inference: threads pool, one engine
    atelier beat             # Celery beat (periodic tasks)
    atelier manage ARGS...   # Django's manage.py
    atelier run              # `make run`: migrate, then every process of deploy/Procfile
                             # (honcho), on a private PostgreSQL and Redis unless
                             # DATABASE_URL / REDIS_URL name servers (controlplane.devservers)
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

from jobcontracts import queues
from jobcontracts.broker import data_dir

USAGE = __doc__ or ""


def _exec(argv: list[str]) -> None:
    # `python -m uvicorn|celery` with this interpreter: works whether or not the
    # virtual environment's bin/ is on PATH.
    sys.stdout.flush()
    os.execv(sys.executable, [sys.executable, "-m", *argv])  # noqa: S606 - fixed argv, no shell


#: prometheus-client's multiprocess mode: where each process of a server writes its samples.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def metrics_dir(name: str) -> Path:
    """An empty directory for the multiprocess metrics of one start of a server (`name`:
    `web-8000`, `worker-control`), under the data dir: a restart must not add the old
    processes' counts to the new ones'. Named by host too: pods may share a volume."""
    path = data_dir() / "metrics" / f"{socket.gethostname()}-{name}"
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def web_argv() -> list[str]:
    return [
        "uvicorn",
        "controlplane.asgi:application",
        "--host",
        os.environ.get("HOST", "127.0.0.1"),
        "--port",
        os.environ.get("PORT", "8000"),
        "--workers",
        os.environ.get("WEB_CONCURRENCY", "1"),
        "--no-access-log",  # our middleware logs each request as JSON, with its request id
        "--proxy-headers",
        "--forwarded-allow-ips",
        os.environ.get("FORWARDED_ALLOW_IPS", "127.0.0.1"),
        "--timeout-graceful-shutdown",
        "20",
    ]


def _quiet_celery_under_json_logs() -> None:
    """No banner from a Celery worker or beat under JSON logs, so that every line it writes
    is one JSON object (`celery --quiet`, read from the environment by Celery's CLI);
    LOG_FORMAT=console (`make run`) keeps it."""
    if os.environ.get("LOG_FORMAT", "json") != "console":
        os.environ.setdefault("CELERY_QUIET", "1")


def worker_argv(kind: str) -> list[str]:
    if kind == "control":
        return [
            "celery",
            "-A",
            "controlplane.celery",
            "worker",
            "-Q",
            queues.CONTROL,
            "-n",
            "control@%h",
            "--concurrency",
            os.environ.get("CONTROL_CONCURRENCY", "2"),
            "--loglevel",
            os.environ.get("LOG_LEVEL", "INFO"),
        ]
    if kind == "gpu":
        # One process per GPU: a host with N GPUs runs N child processes.
        return [
            "celery",
            "-A",
            "gpuworkers.celery",
            "worker",
            "-Q",
            ",".join(queues.GPU_QUEUES),
            "-n",
            "gpu@%h",
            "--concurrency",
            os.environ.get("GPU_WORKER_CONCURRENCY", "1"),
            "--loglevel",
            os.environ.get("LOG_LEVEL", "INFO"),
        ]
    if kind == "inference":
        # Threads, not processes: every task thread hands its request to the one
        # engine of this process, which owns the models and batches the requests.
        return [
            "celery",
            "-A",
            "gpuworkers.celery",
            "worker",
            "-Q",
            queues.GPU_INFERENCE,
            "-n",
            "inference@%h",
            "--pool",
            "threads",
            "--concurrency",
            os.environ.get("INFERENCE_CONCURRENCY", "64"),
            "--loglevel",
            os.environ.get("LOG_LEVEL", "INFO"),
        ]
    raise SystemExit(f"unknown worker kind {kind!r}: use 'control', 'gpu' or 'inference'")


def beat_argv() -> list[str]:
    schedule = data_dir() / "celerybeat-schedule"
    schedule.parent.mkdir(parents=True, exist_ok=True)
    return [
        "celery",
        "-A",
        "controlplane.celery",
        "beat",
        "-s",
        str(schedule),
        "--loglevel",
        os.environ.get("LOG_LEVEL", "INFO"),
    ]


def run(port: str) -> int:
    """`make run`: the private servers (what the environment does not name), migrations,
    the demo models, then deploy/Procfile under honcho. Ctrl-C or SIGTERM stops honcho's
    processes first, then the servers. Returns honcho's exit status."""
    # The `run` extra (psutil, the server wheels): not in production images.
    from controlplane import devservers

    honcho: subprocess.Popen[bytes] | None = None
    stopping: list[int] = []

    def stop(signum: int, _frame: object) -> None:
        stopping.append(signum)
        if honcho is not None and honcho.poll() is None:
            # Honcho stops its processes once, however often asked (a terminal's Ctrl-C
            # reaches it too); passing SIGINT on keeps its exit status 130.
            honcho.send_signal(signal.SIGINT if signum == signal.SIGINT else signal.SIGTERM)

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, stop)
    try:
        servers = devservers.start(data_dir(), os.environ)
    except devservers.DevServerError as error:
        print(f"atelier run: {error}", file=sys.stderr)
        return 1
    try:
        for server in servers.servers:
            where = server.url.rsplit("@", 1)[-1]  # no password in the log
            print(f"atelier run: private {server.name} (pid {server.pid}) on {where}", flush=True)
        env = {**os.environ, **servers.env}
        # On a laptop the workers' metrics ports stay on loopback (containers: all interfaces).
        env.setdefault("CONTROL_METRICS_HOST", "127.0.0.1")
        env.setdefault("METRICS_HOST", "127.0.0.1")
        # Human-readable log lines on a laptop, from every process (the GPU workers read it
        # too: they have no Django settings); JSON everywhere else.
        env.setdefault("LOG_FORMAT", "console")
        # The Procfile's `atelier ...` commands: this interpreter's bin/ first on PATH.
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        manage = [sys.executable, "-m", "controlplane.cli", "manage"]
        for step in (["migrate", "--noinput"], ["install_demo_models"], ["banner"]):
            if stopping:
                return 128 + stopping[0]
            done = subprocess.run([*manage, *step], env=env, check=False)  # noqa: S603
            if done.returncode != 0:
                return done.returncode
        if stopping:
            return 128 + stopping[0]
        root = Path(__file__).resolve().parents[2]
        procfile = str(root / "deploy" / "Procfile")
        honcho = subprocess.Popen(  # noqa: S603 - fixed argv
            [sys.executable, "-m", "honcho", "-f", procfile, "-d", str(root), "start", "-p", port],
            env=env,
            # Should this process be killed outright, honcho still stops its processes.
            preexec_fn=devservers.die_with_parent(signal.SIGTERM),
        )
        return honcho.wait()
    finally:
        servers.stop()


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    # Production unless told otherwise (`make run` picks controlplane.settings.local): it
    # refuses to start without SECRET_KEY, ALLOWED_HOSTS, … instead of running with DEBUG.
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "controlplane.settings.production")
    if not args or args[0] in {"-h", "--help", "help"}:
        print(USAGE)
        return
    command, rest = args[0], args[1:]
    if command == "web":
        # Every uvicorn worker process inherits it; /metrics sums their files.
        os.environ[MULTIPROC_ENV] = str(metrics_dir(f"web-{os.environ.get('PORT', '8000')}"))
        _exec(web_argv())
    elif command == "worker" and len(rest) == 1:
        argv = worker_argv(rest[0])
        # Prefork children (control, gpu) count what their tasks did; the worker's port sums it.
        os.environ[MULTIPROC_ENV] = str(metrics_dir(f"worker-{rest[0]}"))
        _quiet_celery_under_json_logs()
        _exec(argv)
    elif command == "beat":
        _quiet_celery_under_json_logs()
        _exec(beat_argv())
    elif command == "run" and not rest:
        raise SystemExit(run(os.environ.get("PORT", "8000")))
    elif command == "manage":
        from django.core.management import execute_from_command_line

        execute_from_command_line(["atelier manage", *rest])
    else:
        raise SystemExit(USAGE)


if __name__ == "__main__":
    main()
