"""The Celery task's registration: name, queue, acknowledgement, and no torch at import."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_task_module_imports_without_torch_and_registers_the_training_task(
    tmp_path: Path,
) -> None:
    code = """
import sys
import gpuworkers.celery
from gpuworkers.celery import app
app.loader.import_default_modules()  # what the worker does at start: `include`
heavy = sorted(m for m in ("torch", "transformers", "peft") if m in sys.modules)
assert not heavy, heavy
task = app.tasks["gpuworkers.training.run"]
assert task.acks_late is False, "a long job must never be redelivered by the broker"
assert task.ignore_result is True
route = app.amqp.router.route({}, "gpuworkers.training.run")
assert route["queue"].name == "gpu.training", route
print("ok")
"""
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=ROOT,
        env={
            "PATH": "/usr/bin:/bin",
            "PYTHONPATH": str(ROOT / "workers"),
            "ATELIER_DATA_DIR": str(tmp_path),
            # Named, never reached: importing the app and routing a task connect to nothing.
            "REDIS_URL": "redis://127.0.0.1:9/0",
        },
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip() == "ok"


def test_a_gpu_worker_without_a_broker_says_to_set_redis_url(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", "import gpuworkers.celery"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=ROOT,
        env={
            "PATH": "/usr/bin:/bin",
            "PYTHONPATH": str(ROOT / "workers"),
            "ATELIER_DATA_DIR": str(tmp_path),
        },
    )
    assert done.returncode != 0
    assert "No broker: set REDIS_URL (or CELERY_BROKER_URL)" in done.stderr
