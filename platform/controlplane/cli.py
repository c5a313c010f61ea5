"""`atelier`: the one entry point for every process the platform runs.

`make run` (through deploy/Procfile), docker-compose and the Kubernetes
manifests all start processes with these same commands, so what runs on a
laptop is what runs in production. Each command reads its configuration from
the environment and replaces itself with the real server (exec), so signals
(Ctrl-C, SIGTERM) reach uvicorn or Celery directly.

    atelier web              # ASGI server (uvicorn): HOST, PORT, WEB_CONCURRENCY
    atelier worker control   # Celery worker for queue `control` (Django side)
    atelier worker gpu       # Celery worker for gpu.training, gpu.compression (no Django)
    atelier worker inference # Celery worker for gpu.inference: threads pool, one engine
    atelier beat             # Celery beat (periodic tasks)
    atelier manage ARGS...   # Django's manage.py
"""

from __future__ import annotations

import os
import sys

from jobcontracts import queues
from jobcontracts.broker import data_dir

USAGE = __doc__ or ""


def _exec(argv: list[str]) -> None:
    # `python -m uvicorn|celery` with this interpreter: works whether or not the
    # virtual environment's bin/ is on PATH.
    sys.stdout.flush()
    os.execv(sys.executable, [sys.executable, "-m", *argv])  # noqa: S606 - fixed argv, no shell


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
        _exec(web_argv())
    elif command == "worker" and len(rest) == 1:
        _exec(worker_argv(rest[0]))
    elif command == "beat":
        _exec(beat_argv())
    elif command == "manage":
        from django.core.management import execute_from_command_line

        execute_from_command_line(["atelier manage", *rest])
    else:
        raise SystemExit(USAGE)


if __name__ == "__main__":
    main()
