"""The GPU workers' logs (no Django): one JSON object a line with the record's extras and
the job id bound for the whole task, secrets removed, human lines under LOG_FORMAT=console;
from the real `atelier worker gpu` too."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import structlog

from gpuworkers import logs
from jobcontracts import queues
from jobcontracts.redaction import REDACTED

KEY = "atl_live_ZyXwVuTs_" + "workerSideSecret" * 2 + "qwerty12" + "345678"
BIN = Path(sys.executable).parent


@pytest.fixture
def root_logging() -> Iterator[io.StringIO]:
    """`logs.configure` on a stream of the test's own; the root logger and structlog's
    configuration are put back after."""
    root = logging.getLogger()
    saved = (list(root.handlers), root.level, structlog.get_config())
    stream = io.StringIO()
    stderr, sys.stderr = sys.stderr, stream
    try:
        logs.configure(logging.INFO, "json")
    finally:
        sys.stderr = stderr
    try:
        yield stream
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in saved[0]:
            root.addHandler(handler)
        root.setLevel(saved[1])
        structlog.configure(**saved[2])


def test_a_task_binds_its_job_id_and_every_line_is_json_with_its_extras(
    root_logging: io.StringIO,
) -> None:
    log = logging.getLogger("gpuworkers.training.engine")
    with logs.bound_job({"job_id": "ftjob-abc", "attempt": 3, "hyperparameters": {}}):
        log.info("training.step", extra={"step": 4, "request_id": "chatcmpl-1"})
        structlog.get_logger("gpuworkers.x").info("training.checkpoint", uri="s3://b/k")
    log.info("training.idle")
    lines = [json.loads(line) for line in root_logging.getvalue().splitlines()]
    step, checkpoint, idle = lines
    assert step["event"] == "training.step"
    assert (step["job_id"], step["attempt"], step["step"]) == ("ftjob-abc", 3, 4)
    assert step["request_id"] == "chatcmpl-1"
    assert checkpoint["job_id"] == "ftjob-abc"
    assert checkpoint["uri"] == "s3://b/k"
    assert "job_id" not in idle  # unbound when the task ends


def test_a_worker_line_never_shows_a_key_a_prompt_or_a_password(root_logging: io.StringIO) -> None:
    log = logging.getLogger("gpuworkers.inference.task")
    log.warning(
        "inference.refused %s",
        KEY,
        extra={
            "messages": [{"role": "user", "content": "the secret plan"}],
            "prompt": "the secret plan",
            "password": "hunter2hunter2",
            "broker": "redis://:brokerpass@10.0.0.1:6379/0",
        },
    )
    raw = root_logging.getvalue()
    for secret in (KEY, "workerSideSecret", "the secret plan", "hunter2hunter2", "brokerpass"):
        assert secret not in raw
    (line,) = [json.loads(x) for x in raw.splitlines()]
    assert line["event"] == f"inference.refused atl_live_ZyXwVuTs_{REDACTED}"
    assert line["messages"] == line["prompt"] == line["password"] == REDACTED


def test_console_format_renders_human_lines() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.formatter("console"))
    log = logging.getLogger("tests.gpu.console")
    log.addHandler(handler)
    log.propagate = False
    try:
        with logs.bound(job_id="ftjob-console"):
            log.warning("training.step", extra={"step": 2})
    finally:
        log.removeHandler(handler)
    text = stream.getvalue()
    assert "training.step" in text
    assert "job_id=ftjob-console" in text
    assert "step=2" in text
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)


def test_an_unknown_log_format_is_refused() -> None:
    with pytest.raises(ValueError, match="LOG_FORMAT"):
        logs.log_format({"LOG_FORMAT": "xml"})


# -- the real worker -------------------------------------------------------------------

_ROOT_WARNING_START = "SecurityWarning: You're running the worker with superuser privileges"
_ROOT_WARNING_END = "_warn_or_raise_security_error("
#: What Celery writes raw from its SIGTERM handler, where logging is not safe.
_SHUTDOWN_NOTICE = ("", "worker: Warm shutdown (MainProcess)")


def _plain(text: str) -> list[str]:
    """Lines that are not JSON objects, but for Celery's as-root warning (printed before
    logging is configured; the images never run as root)."""
    bad, in_warning = [], False
    for line in text.splitlines():
        if os.geteuid() == 0 and _ROOT_WARNING_START in line:
            in_warning = True
        if in_warning:
            in_warning = _ROOT_WARNING_END not in line
            continue
        if line.strip() in _SHUTDOWN_NOTICE:
            continue
        try:
            ok = isinstance(json.loads(line), dict)
        except json.JSONDecodeError:
            ok = False
        if not ok:
            bad.append(line)
    return bad


def _wait(check: Callable[[], bool], timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.3)
    raise AssertionError("timed out")


def _gpu_worker(tmp: Path, log_format: str) -> tuple[subprocess.Popen[bytes], Path]:
    log = tmp / f"gpu-{log_format}.log"
    env = dict(os.environ)
    env.pop("DJANGO_SETTINGS_MODULE", None)
    env.update(
        LOG_FORMAT=log_format,
        LOG_LEVEL="INFO",
        PYTHONUNBUFFERED="1",
        GPU_WORKER_PRELOAD="0",
        GPU_METRICS_PORT="0",
        REDIS_URL=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/15"),
        ATELIER_DATA_DIR=str(tmp / "data"),
    )
    with log.open("wb") as out:
        process = subprocess.Popen(
            [str(BIN / "atelier"), "worker", "gpu"], env=env, stdout=out, stderr=subprocess.STDOUT
        )
    return process, log


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


@pytest.mark.slow
def test_the_real_gpu_worker_writes_only_json_lines_carrying_the_job_id(tmp_path: Path) -> None:
    from gpuworkers.celery import app
    from tests.support.jobs import purge_broker

    purge_broker()
    process, log = _gpu_worker(tmp_path, "json")
    try:
        _wait(lambda: "ready." in log.read_text())
        # A spec the worker cannot read: it fails the attempt, logging the job's id.
        app.send_task(
            queues.TRAIN,
            args=[{"job_id": "ftjob-logs-1", "attempt": 2, "secret": KEY}],
            queue=queues.GPU_TRAINING,
        )
        _wait(lambda: "training.invalid_spec" in log.read_text())
        time.sleep(1)
    finally:
        _stop(process)
        purge_broker()
    text = log.read_text()
    assert _plain(text) == []
    assert KEY not in text
    assert "workerSideSecret" not in text
    lines = [json.loads(x) for x in text.splitlines() if x.startswith("{")]
    (invalid,) = [x for x in lines if x["event"] == "training.invalid_spec"]
    assert invalid["job_id"] == "ftjob-logs-1"
    assert invalid["attempt"] == 2
    assert any(x["logger"].startswith("celery") for x in lines)  # Celery's own lines too


@pytest.mark.slow
def test_the_real_gpu_worker_writes_human_lines_under_console(tmp_path: Path) -> None:
    process, log = _gpu_worker(tmp_path, "console")
    try:
        _wait(lambda: "ready." in log.read_text())
    finally:
        _stop(process)
    lines = [x for x in log.read_text().splitlines() if "ready." in x]
    assert lines
    assert not lines[0].startswith("{")
    assert "[info" in lines[0]
