"""Logs: one JSON object a line from every process, the request id and the job id on
the lines that concern them, no secret, key, password, prompt or file content anywhere,
and human lines under LOG_FORMAT=console (`make run`).

The real run starts `atelier web`, `atelier worker control` and `atelier worker gpu`
with their output in files, signs up, trains a tiny model and is refused a completion
over HTTP, then reads the files as an operator's log shipper would.
"""

from __future__ import annotations

import io
import itertools
import json
import logging
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import structlog

from controlplane.jobs.models import Job, JobStatus
from jobcontracts.redaction import REDACTED
from tests.support.jobs import TINY_LLAMA, purge_broker, register_tiny_llama
from tests.support.plans import set_plan
from tests.support.processes import Server, asgi_server, test_env, worker

KEY = "atl_live_AbCdEfGh_" + "s3cr3tK3yMaterial" * 2 + "abcdef" + "123456"
PASSWORD = "correct horse battery staple 8431"
PROMPT = "my confidential prompt about project nightingale"
FILE_MARKER = "quarterly figures for the zanzibar account"


def _formatter(log_format: str) -> logging.Formatter:
    """The formatter settings.LOGGING builds, as dictConfig would."""
    from controlplane.core.logs import formatter

    spec = dict(formatter(log_format))
    factory = spec.pop("()")
    return factory(**spec)  # type: ignore[no-any-return]


def _lines(log_format: str, emit: Callable[[], None]) -> list[str]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(_formatter(log_format))
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        emit()
    finally:
        root.removeHandler(handler)
    return stream.getvalue().splitlines()


def test_every_line_drops_secrets_prompts_and_file_contents_and_cuts_keys_to_their_prefix() -> None:
    def emit() -> None:
        log = structlog.get_logger("tests.logging")
        with structlog.contextvars.bound_contextvars(request_id="req_abc"):
            log.warning(
                "signup.attempt",
                authorization=f"Bearer {KEY}",
                password=PASSWORD,
                messages=[{"role": "user", "content": PROMPT}],
                nested={"api_key": KEY, "file_contents": FILE_MARKER, "tokens": 12},
                note=f"the caller sent {KEY} in the body",
                prompt_tokens=7,
            )
        logging.getLogger("tests.stdlib").warning(
            "refused %s", KEY, extra={"prompt": PROMPT, "client_secret": "abc123xyz"}
        )
        try:
            raise ValueError(f"bad key {KEY}")
        except ValueError:
            logging.getLogger("tests.stdlib").exception("boom")

    lines = _lines("json", emit)
    raw = "\n".join(lines)
    for secret in (KEY, PASSWORD, PROMPT, FILE_MARKER, "abc123xyz", "s3cr3tK3y"):
        assert secret not in raw
    first, second, third = (json.loads(line) for line in lines)
    assert first["request_id"] == "req_abc"
    assert first["password"] == first["messages"] == first["authorization"] == REDACTED
    assert first["nested"] == {"api_key": REDACTED, "file_contents": REDACTED, "tokens": 12}
    assert first["note"] == f"the caller sent atl_live_AbCdEfGh_{REDACTED} in the body"
    assert first["prompt_tokens"] == 7
    assert second["event"] == f"refused atl_live_AbCdEfGh_{REDACTED}"
    assert second["prompt"] == second["client_secret"] == REDACTED
    assert "ValueError: bad key atl_live_AbCdEfGh_" in third["exception"]


def test_a_job_logs_each_status_change_once_with_its_ids(
    alice: Any, django_capture_on_commit_callbacks: Any, caplog: pytest.LogCaptureFixture
) -> None:
    from tests.support.jobs import chat_rows, create_job, upload_file

    set_plan("free", concurrent_fine_tuning_jobs=4)
    register_tiny_llama()
    purge_broker()
    file_id = upload_file(alice, chat_rows(8), django_capture_on_commit_callbacks)
    caplog.set_level(logging.INFO, logger="controlplane.jobs")
    response = create_job(
        alice, django_capture_on_commit_callbacks, model=TINY_LLAMA, training_file=file_id
    )
    assert response.status_code == 200, response.content
    job_id = response.json()["id"]
    with django_capture_on_commit_callbacks(execute=True):
        assert alice.client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel").status_code == 200
    purge_broker()
    transitions = [
        r.msg
        for r in caplog.records
        if isinstance(r.msg, dict) and r.msg.get("event") == "job.transition"
    ]
    steps = [(t["from"], t["to"]) for t in transitions]
    assert steps[0] == (None, JobStatus.VALIDATING_FILES)
    assert (JobStatus.VALIDATING_FILES, JobStatus.QUEUED) in steps
    assert steps[-1] == (JobStatus.QUEUED, JobStatus.CANCELLED)
    assert all(before[1] == after[0] for before, after in itertools.pairwise(steps))
    for t in transitions:
        assert t["job_id"] == job_id
        assert t["organization_id"] == alice.organization.pk
        assert t["kind"] == "fine_tuning"
        assert "attempt" in t


# -- a real run ----------------------------------------------------------------------------

ENV = {
    "JOBS_LEASE_SECONDS": "30",
    "JOBS_HEARTBEAT_SECONDS": "1",
    "OMP_NUM_THREADS": "1",
    "GPU_WORKER_PRELOAD": "0",
    "LOG_LEVEL": "INFO",
}
#: Celery warns, before any logging is configured, when a worker runs as root (tests may;
#: the images never do: deploy/Dockerfile*); that warning is the only plain text allowed.
_ROOT_WARNING_START = "SecurityWarning: You're running the worker with superuser privileges"
_ROOT_WARNING_END = "_warn_or_raise_security_error("
#: What Celery writes raw from its SIGTERM handler, where logging is not safe.
_SHUTDOWN_NOTICE = ("", "worker: Warm shutdown (MainProcess)")


def json_lines(path: Path) -> list[dict[str, Any]]:
    """Every line of a log, parsed; fails on the first one that is not a JSON object."""
    parsed = []
    in_warning = False
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if os.geteuid() == 0 and _ROOT_WARNING_START in line:
            in_warning = True
        if in_warning:
            in_warning = _ROOT_WARNING_END not in line
            continue
        if line.strip() in _SHUTDOWN_NOTICE:
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError:
            pytest.fail(f"{path.name}:{number} is not JSON: {line!r}")
        assert isinstance(value, dict), f"{path.name}:{number}: {line!r}"
        parsed.append(value)
    return parsed


def wait_for(check: Callable[[], bool], what: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def _training_file() -> bytes:
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"{FILE_MARKER} row {i}"},
                {"role": "assistant", "content": "noted and filed"},
            ]
        }
        for i in range(8)
    ]
    return b"".join(json.dumps(r).encode() + b"\n" for r in rows)


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_a_real_run_logs_json_with_request_and_job_ids_and_never_a_secret(tmp_path: Path) -> None:
    purge_broker()
    set_plan("free", concurrent_fine_tuning_jobs=4)
    register_tiny_llama()
    with (
        worker("control", tmp_path / "control", **ENV),
        worker("gpu", tmp_path / "gpu", **ENV),
        asgi_server(tmp_path / "web", **ENV) as server,
    ):
        http = httpx.Client(base_url=server.url, timeout=60)
        signup = http.post(
            "/v1/signup",
            json={"email": "logs@example.com", "password": PASSWORD, "organization_name": "Logs"},
        )
        assert signup.status_code == 201, signup.text
        key = signup.json()["api_key"]["value"]
        auth = {"Authorization": f"Bearer {key}"}
        # A second sign-up, a key in the URL, a wrong key: refused, and never logged.
        http.post(
            "/v1/signup",
            json={"email": "logs@example.com", "password": PASSWORD, "organization_name": "X"},
        )
        assert http.get("/v1/models", params={"api_key": key}).status_code == 401
        assert http.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 401

        upload = http.post(
            "/v1/files",
            headers=auth,
            files={"file": ("train.jsonl", _training_file())},
            data={"purpose": "fine-tune"},
        )
        assert upload.status_code == 200, upload.text
        file_id = upload.json()["id"]
        wait_for(
            lambda: http.get(f"/v1/files/{file_id}", headers=auth).json()["status"] == "processed",
            "file validation",
        )
        created = http.post(
            "/v1/fine_tuning/jobs",
            headers={**auth, "x-request-id": "req-logs-create-1"},
            json={
                "model": TINY_LLAMA,
                "training_file": file_id,
                "seed": 3,
                "method": {
                    "type": "supervised",
                    "supervised": {"hyperparameters": {"n_epochs": 1, "batch_size": 4}},
                },
            },
        )
        assert created.status_code == 200, created.text
        assert created.headers["x-request-id"] == "req-logs-create-1"
        job_id = created.json()["id"]
        wait_for(
            lambda: Job.objects.dangerously_unscoped().get(pk=job_id).status == JobStatus.SUCCEEDED,
            "the fine-tune",
        )
        refused = http.post(
            "/v1/chat/completions",
            headers={**auth, "x-request-id": "req-logs-refused-1"},
            json={"model": "no-such-model", "messages": [{"role": "user", "content": PROMPT}]},
        )
        assert refused.status_code == 404, refused.text
        assert refused.headers["x-request-id"] == "req-logs-refused-1"
        time.sleep(1.5)  # the control worker's last report lines

    logs = {name: tmp_path / name / f"{name}.log" for name in ("control", "gpu")}
    logs["web"] = tmp_path / "web" / "web.log"
    parsed = {name: json_lines(path) for name, path in logs.items()}

    raw = b"".join(path.read_bytes() for path in logs.values())
    for secret in (key, key[len("atl_live_") + 9 :], PASSWORD, PROMPT, FILE_MARKER, KEY):
        assert secret.encode() not in raw, f"{secret!r} is in the logs"

    def with_job(name: str) -> list[dict[str, Any]]:
        return [line for line in parsed[name] if line.get("job_id") == job_id]

    # The job id through the web, the control worker and the GPU worker.
    assert with_job("web")
    assert with_job("control")
    assert with_job("gpu")
    assert any(line["event"] == "training.attempt_received" for line in with_job("gpu"))
    gpu_events = {line["event"] for line in with_job("gpu")}
    assert len(gpu_events) >= 2, gpu_events  # bound for the whole task, not one line
    transitions = [
        (line["from"], line["to"])
        for name in ("web", "control")
        for line in with_job(name)
        if line["event"] == "job.transition"
    ]
    assert (JobStatus.QUEUED, JobStatus.RUNNING) in transitions
    assert (JobStatus.RUNNING, JobStatus.SUCCEEDED) in transitions

    # The caller's request id on its request line, with who called and the model asked.
    org_id = Job.objects.dangerously_unscoped().get(pk=job_id).organization_id
    (line,) = [
        line
        for line in parsed["web"]
        if line["event"] == "http.request" and line.get("request_id") == "req-logs-create-1"
    ]
    assert line["status"] == 200
    assert line["organization_id"] == org_id
    assert line["api_key_id"]
    assert line["model"] == TINY_LLAMA
    created_lines = [x for x in with_job("web") if x.get("request_id") == "req-logs-create-1"]
    assert created_lines  # the job's first lines carry the request that made it
    (refused_line,) = [
        line
        for line in parsed["web"]
        if line["event"] == "http.request" and line.get("request_id") == "req-logs-refused-1"
    ]
    assert refused_line["status"] == 404
    assert refused_line["organization_id"] == org_id


def test_log_format_console_renders_human_lines(tmp_path: Path) -> None:
    with asgi_server(tmp_path / "web", LOG_FORMAT="console") as server:
        httpx.get(server.url + "/v1/models", headers={"x-request-id": "req-console-1"})
        time.sleep(0.5)
    text = Server.log_lines(server)
    mine = [line for line in text if "req-console-1" in line]
    assert mine
    assert "http.request" in mine[0]
    for line in text:  # uvicorn's own lines too: one renderer for every line
        assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+Z \[\w+ *\] ", line), line


def test_the_local_settings_default_to_console_logs_and_the_others_to_json(tmp_path: Path) -> None:
    script = (
        "from django.conf import settings; "
        "f = settings.LOGGING['formatters']['structured']; "
        "print(type(f['processors'][-1]).__name__)"
    )
    found = {}
    for module in ("controlplane.settings.local", "controlplane.settings.test"):
        env = test_env(DJANGO_SETTINGS_MODULE=module, ATELIER_DATA_DIR=str(tmp_path))
        env.pop("LOG_FORMAT")
        done = subprocess.run(
            [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=False
        )
        assert done.returncode == 0, done.stderr
        found[module] = done.stdout.strip()
    assert found == {
        "controlplane.settings.local": "ConsoleRenderer",
        "controlplane.settings.test": "JSONRenderer",
    }
