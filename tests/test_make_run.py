"""`make run` with nothing configured, `make demo` against it, Ctrl-C stopping everything,
and a second `make run` on the same data.

This runs the real Makefile target, as a user would, with nothing configured: a private
PostgreSQL and Redis under a fresh data directory (controlplane.devservers), and every
feature as in production: usage and costs, rate-limit headers, the Redis transport.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest

from tests.support.processes import free_port

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
CONFIG_VARS = (
    "DATABASE_URL",
    "REDIS_URL",
    "CELERY_BROKER_URL",
    "DJANGO_SETTINGS_MODULE",
    "AWS_STORAGE_BUCKET_NAME",
    "CACHE_URL",
)
#: From a fresh clone, after the install step (issue 11).
READY_WITHIN_S = 120


@dataclass
class Run:
    url: str
    process: subprocess.Popen[bytes]
    log: Path
    data: Path
    ready_s: float

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def pids(self) -> dict[str, int]:
        """Every process it started: the two private servers and honcho's processes."""
        text = self.text()
        found = {m[0]: int(m[1]) for m in re.findall(r"private (\w+) \(pid (\d+)\)", text)}
        found.update(
            {m[0]: int(m[1]) for m in re.findall(r"\| (\w+\.1) started \(pid=(\d+)\)", text)}
        )
        return found


def _group_alive(pgid: int, leader: subprocess.Popen[bytes] | None = None) -> bool:
    if leader is not None:
        leader.poll()  # reap `make` itself: a zombie still counts as a group member
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _alive(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


def _start(data: Path, label: str) -> Run:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in CONFIG_VARS}
    env.update(ATELIER_DATA_DIR=str(data), PORT=str(port), PYTHONUNBUFFERED="1")
    log = data.parent / f"make-run-{label}.log"
    started = time.monotonic()
    with log.open("wb") as out:
        # Its own process group, like a terminal's foreground job: Ctrl-C reaches all of it.
        process = subprocess.Popen(
            ["make", "run"],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = started + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"make run exited:\n{log.read_text()[-4000:]}")
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    else:
        _kill(process)
        pytest.fail("make run did not become ready:\n" + log.read_text()[-4000:])
    ready_s = time.monotonic() - started
    print(f"\nmake run ({label} data directory): /readyz answered after {ready_s:.1f} s")
    return Run(url, process, log, data, ready_s)


def _kill(process: subprocess.Popen[bytes]) -> None:
    if _group_alive(process.pid):
        os.killpg(process.pid, signal.SIGKILL)  # the private servers follow their parent
    process.wait(timeout=30)


def _stopped(run: Run, pids: dict[str, int], timeout: float = 60) -> list[str]:
    """The names of the processes still running once `make` has exited."""
    deadline = time.monotonic() + timeout
    while _group_alive(run.process.pid, run.process) and time.monotonic() < deadline:
        time.sleep(0.25)
    while any(_alive(pid) for pid in pids.values()) and time.monotonic() < deadline:
        time.sleep(0.25)
    left = [name for name, pid in pids.items() if _alive(pid)]
    if _group_alive(run.process.pid, run.process):
        left.append("make")
    return left


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("make-run") / "data"


@pytest.fixture(scope="module")
def make_run(data: Path) -> Iterator[Run]:
    run = _start(data, "fresh")
    try:
        yield run
    finally:
        _kill(run.process)


@pytest.fixture(scope="module")
def api_key(make_run: Run) -> str:
    signup = httpx.post(
        make_run.url + "/v1/signup",
        json={
            "email": f"make-run-{os.getpid()}@example.com",
            "password": "a long enough passphrase",
            "organization_name": "Make Run",
        },
        timeout=30,
    )
    assert signup.status_code == 201, signup.text
    return str(signup.json()["api_key"]["value"])


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_make_run_is_ready_within_two_minutes_and_prints_where_things_are(
    make_run: Run,
) -> None:
    assert make_run.ready_s < READY_WITHIN_S, make_run.ready_s
    text = make_run.text()
    assert f"Atelier is starting on {make_run.url}" in text
    assert f"{make_run.url}/admin/" in text
    assert "/v1/signup" in text


def test_make_run_starts_a_private_postgresql_and_redis_under_the_data_directory(
    make_run: Run,
) -> None:
    ready = httpx.get(make_run.url + "/readyz").json()
    assert all(check["ok"] for check in ready["checks"].values())
    text = make_run.text()
    assert "Database       PostgreSQL 127.0.0.1:" in text
    assert "Broker         redis://127.0.0.1:" in text
    assert {"postgres", "redis"} <= set(make_run.pids())
    assert (make_run.data / "postgres" / "PG_VERSION").exists()
    assert (make_run.data / "redis" / "appendonly.aof").exists()
    for process_name in ("web.1", "control.1", "gpu.1", "inference.1", "beat.1"):
        assert process_name in text
    # The passwords of the private servers stay out of the log.
    state = json.loads((make_run.data / "devservers.json").read_text())
    for server in ("postgres", "redis"):
        assert state[server]["password"] not in text


def test_usage_and_costs_answer_on_make_run(make_run: Run, api_key: str) -> None:
    for path in ("/v1/organization/usage", "/v1/organization/costs"):
        answer = httpx.get(
            make_run.url + path, params={"start_time": 0}, headers=_auth(api_key), timeout=30
        )
        assert answer.status_code == 200, (path, answer.text)
        assert answer.json()["object"] == "page", answer.text
    preview = httpx.get(
        make_run.url + "/v1/organization/invoices/upcoming", headers=_auth(api_key), timeout=30
    )
    assert preview.status_code == 200, preview.text


def test_a_completion_through_redis_carries_rate_limit_headers(make_run: Run, api_key: str) -> None:
    answer = httpx.post(
        make_run.url + "/v1/chat/completions",
        json={
            "model": "atelier-tiny-llama",
            "messages": [{"role": "user", "content": "hello"}],
            "max_tokens": 4,
        },
        headers=_auth(api_key),
        timeout=120,
    )
    assert answer.status_code == 200, answer.text
    assert answer.json()["usage"]["completion_tokens"] == 4
    for header in ("limit-requests", "remaining-requests", "limit-tokens", "remaining-tokens"):
        assert f"x-ratelimit-{header}" in answer.headers, dict(answer.headers)
    assert int(answer.headers["x-ratelimit-remaining-requests"]) < int(
        answer.headers["x-ratelimit-limit-requests"]
    )


def test_make_demo_walks_the_customer_journey(make_run: Run) -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "deploy" / "demo.py"), "--base-url", make_run.url],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "steps passed" in done.stdout


def test_ctrl_c_stops_the_server_every_worker_and_the_private_servers(
    make_run: Run, api_key: str
) -> None:
    pids = make_run.pids()
    assert {"postgres", "redis", "web.1", "control.1", "beat.1"} <= set(pids), pids
    os.killpg(make_run.process.pid, signal.SIGINT)

    assert _stopped(make_run, pids) == [], make_run.text()[-4000:]
    with pytest.raises(httpx.HTTPError):
        httpx.get(make_run.url + "/healthz", timeout=2)


def test_a_second_make_run_reuses_the_data_and_stops_on_sigterm(
    make_run: Run, api_key: str, data: Path
) -> None:
    assert make_run.process.poll() is not None, "the first run must have stopped"
    again = _start(data, "reused")
    try:
        # The key made in the first run, read from the same private database.
        models = httpx.get(again.url + "/v1/models", headers=_auth(api_key), timeout=30)
        assert models.status_code == 200, models.text
        assert "atelier-tiny-llama" in {m["id"] for m in models.json()["data"]}
        assert "already installed" in again.text()
        pids = again.pids()
        assert {"postgres", "redis"} <= set(pids), pids
        os.kill(again.process.pid, signal.SIGTERM)  # `make` alone, as a service manager would
        assert _stopped(again, pids) == [], again.text()[-4000:]
    finally:
        _kill(again.process)


def test_make_test_fails_at_once_when_services_are_down() -> None:
    env = {
        **os.environ,
        "DATABASE_URL": "postgres://postgres@127.0.0.1:9/x",
        "REDIS_URL": "redis://127.0.0.1:9/0",
    }
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "preflight.py")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1
    assert time.monotonic() - started < 20
    assert "PostgreSQL is unreachable" in done.stderr
    assert "pg_ctlcluster" in done.stderr
    assert "Redis is unreachable" in done.stderr
    assert "redis-server" in done.stderr
