"""The control plane reaches real Celery workers by task name only, through Redis."""

from __future__ import annotations

from pathlib import Path

import pytest

from jobcontracts import queues
from tests.support.processes import worker

pytestmark = pytest.mark.slow


def test_control_plane_pings_the_gpu_worker_by_task_name(db: None, tmp_path: Path) -> None:
    from controlplane.celery import app

    with worker("gpu", tmp_path):
        result = app.send_task(queues.GPU_PING, queue=queues.GPU_TRAINING)
        answer = result.get(timeout=60)

    assert answer["ok"] is True
    assert answer["accelerator"]  # "cpu", "cuda:…" or "none (torch not installed)"


def test_control_worker_runs_control_tasks(db: None, tmp_path: Path) -> None:
    from controlplane.celery import app

    with worker("control", tmp_path):
        answer = app.send_task(queues.CONTROL_PING, queue=queues.CONTROL).get(timeout=60)

    assert answer == {"ok": True}


def test_gpu_worker_never_sets_up_django_even_when_settings_are_in_the_env() -> None:
    import os
    import subprocess
    import sys

    # kombu imports django.utils.functional.Promise when Django is installed (JSON
    # support); what matters is that nothing configures Django or touches the database.
    code = (
        "import sys, gpuworkers.celery;"
        "bad=[m for m in sys.modules if m.split('.')[0] in ('controlplane','rest_framework',"
        "'stripe') or m.startswith(('django.conf', 'django.db', 'django.apps'))];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "controlplane.settings.test"}
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
    )
    assert done.returncode == 0, done.stdout + done.stderr
