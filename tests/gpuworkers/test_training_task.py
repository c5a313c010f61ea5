"""The Celery task's registration: name, queue, acknowledgement, and no torch at import."""

from __future__ import annotations

from pathlib import Path

from tests.gpuworkers.helpers import UNREACHED_REDIS, run_bare_worker_python


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
    done = run_bare_worker_python(code, tmp_path, REDIS_URL=UNREACHED_REDIS)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip() == "ok"


def test_a_gpu_worker_without_a_broker_says_to_set_redis_url(tmp_path: Path) -> None:
    done = run_bare_worker_python("import gpuworkers.celery", tmp_path)
    assert done.returncode != 0
    assert "No broker: set REDIS_URL (or CELERY_BROKER_URL)" in done.stderr
