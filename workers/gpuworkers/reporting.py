"""Where a training attempt's reports go: the control plane's `control` queue."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from jobcontracts import queues
from jobcontracts.training import Report


def celery_reporter(app: Any) -> Callable[[Report], None]:
    """Send each report as the task `controlplane.jobs.report` on queue `control`."""

    def send(report: Report) -> None:
        app.send_task(queues.CONTROL_JOB_REPORT, args=[report.to_json()], queue=queues.CONTROL)

    return send


def file_reporter(path: Path) -> Callable[[Report], None]:
    """Append each report as a JSON line (a distributed rank 0 → the task that launched it)."""
    lock = threading.Lock()

    def send(report: Report) -> None:
        line = json.dumps(report.to_json()) + "\n"
        with lock, path.open("a", encoding="utf-8") as out:
            out.write(line)
            out.flush()

    return send
