"""The inference task's registration and the worker command that serves it."""

from __future__ import annotations

from pathlib import Path

import pytest

from controlplane.cli import worker_argv
from gpuworkers.inference.config import Settings
from jobcontracts import queues
from jobcontracts.broker import data_dir
from tests.gpuworkers.helpers import UNREACHED_REDIS, run_bare_worker_python


def test_the_task_registers_on_the_inference_queue_without_importing_torch(
    tmp_path: Path,
) -> None:
    code = """
import sys
from gpuworkers.celery import app
app.loader.import_default_modules()  # what the worker does at start: `include`
heavy = sorted(m for m in ("torch", "transformers", "peft") if m in sys.modules)
assert not heavy, heavy
task = app.tasks["gpuworkers.inference.run"]
assert task.acks_late is False, "a request must never be redelivered and run twice"
assert task.ignore_result is True
assert app.amqp.router.route({}, "gpuworkers.inference.run")["queue"].name == "gpu.inference"
assert app.amqp.router.route({}, "gpuworkers.training.run")["queue"].name == "gpu.training"
print("ok")
"""
    done = run_bare_worker_python(code, tmp_path, REDIS_URL=UNREACHED_REDIS)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip() == "ok"


def test_atelier_worker_inference_runs_a_threads_pool_on_the_inference_queue(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("INFERENCE_CONCURRENCY", raising=False)
    argv = worker_argv("inference")
    assert argv[:4] == ["celery", "-A", "gpuworkers.celery", "worker"]
    assert argv[argv.index("-Q") + 1] == queues.GPU_INFERENCE
    assert argv[argv.index("--pool") + 1] == "threads"
    assert argv[argv.index("--concurrency") + 1] == "64"
    assert argv[argv.index("-n") + 1] == "inference@%h"
    monkeypatch.setenv("INFERENCE_CONCURRENCY", "8")
    assert worker_argv("inference")[argv.index("--concurrency") + 1] == "8"


def test_the_gpu_worker_leaves_inference_to_inference_workers() -> None:
    argv = worker_argv("gpu")
    consumed = argv[argv.index("-Q") + 1].split(",")
    assert consumed == [queues.GPU_TRAINING, queues.GPU_COMPRESSION]


def test_engine_settings_come_from_the_environment(tmp_path: Path) -> None:
    assert Settings.from_env({"ATELIER_DATA_DIR": str(tmp_path)}) == Settings(
        cache_dir=data_dir({"ATELIER_DATA_DIR": str(tmp_path)}) / "inference-cache",
        usage_spool_dir=tmp_path / "spool" / "usage",
    )
    settings = Settings.from_env(
        {
            "INFERENCE_MAX_BATCH": "8",
            "INFERENCE_BATCH_WAIT_MS": "0.5",
            "INFERENCE_MAX_QUEUE": "3",
            "INFERENCE_MEMORY_BUDGET_MB": "512",
            "INFERENCE_MAX_ADAPTERS": "2",
            "INFERENCE_DEVICE": "cpu",
            "INFERENCE_DTYPE": "bfloat16",
            "TORCH_NUM_THREADS": "2",
            "INFERENCE_CACHE_DIR": str(tmp_path),
            "INFERENCE_USAGE_SPOOL_DIR": str(tmp_path / "usage"),
        }
    )
    assert (settings.max_batch, settings.batch_wait_ms, settings.max_queue) == (8, 0.5, 3)
    assert (settings.memory_budget_mb, settings.max_adapters) == (512.0, 2)
    assert (settings.device, settings.dtype, settings.torch_threads) == ("cpu", "bfloat16", 2)
    assert settings.cache_dir == tmp_path
    assert settings.usage_spool_dir == tmp_path / "usage"
