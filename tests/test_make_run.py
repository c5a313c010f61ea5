"""`make run` on embedded defaults, `make demo` against it, and Ctrl-C stopping everything.

This runs the real Makefile target, as a user would, with nothing configured:
SQLite, kombu's filesystem broker and local files under a fresh data directory.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
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


def _group_alive(pgid: int, leader: subprocess.Popen[bytes] | None = None) -> bool:
    if leader is not None:
        leader.poll()  # reap `make` itself: a zombie still counts as a group member
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture(scope="module")
def make_run(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[str, subprocess.Popen[bytes], Path]]:
    data = tmp_path_factory.mktemp("embedded")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in CONFIG_VARS}
    env.update(ATELIER_DATA_DIR=str(data), PORT=str(port), PYTHONUNBUFFERED="1")
    log = data / "make-run.log"
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
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            assert process.poll() is None, log.read_text()[-4000:]
            try:
                if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        else:
            pytest.fail("make run did not become ready:\n" + log.read_text()[-4000:])
        yield url, process, log
    finally:
        if _group_alive(process.pid):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)


def test_make_run_prints_where_things_are(
    make_run: tuple[str, subprocess.Popen[bytes], Path],
) -> None:
    url, _, log = make_run
    text = log.read_text()
    assert f"Atelier is starting on {url}" in text
    assert f"{url}/admin/" in text
    assert "/v1/signup" in text


def test_make_run_uses_embedded_defaults(
    make_run: tuple[str, subprocess.Popen[bytes], Path],
) -> None:
    url, _, log = make_run
    ready = httpx.get(url + "/readyz").json()
    assert all(check["ok"] for check in ready["checks"].values())
    text = log.read_text()
    assert "atelier.sqlite3" in text
    assert "filesystem://" in text
    for process_name in ("web.1", "control.1", "gpu.1", "beat.1"):
        assert process_name in text


def test_billing_on_the_embedded_database_says_rating_needs_postgresql(
    make_run: tuple[str, subprocess.Popen[bytes], Path],
) -> None:
    url, _, _ = make_run
    signup = httpx.post(
        url + "/v1/signup",
        json={
            "email": f"billing-{os.getpid()}@example.com",
            "password": "a long enough passphrase",
            "organization_name": "Embedded",
        },
        timeout=30,
    )
    assert signup.status_code == 201, signup.text
    headers = {"Authorization": f"Bearer {signup.json()['api_key']['value']}"}
    usage = httpx.get(
        url + "/v1/organization/usage", params={"start_time": 0}, headers=headers, timeout=30
    )
    assert usage.status_code == 501, usage.text
    assert usage.json()["error"]["code"] == "needs_postgresql"
    preview = httpx.get(url + "/v1/organization/invoices/upcoming", headers=headers, timeout=30)
    assert preview.status_code == 501, preview.text
    assert preview.json()["error"]["code"] == "needs_postgresql"
    assert "DATABASE_URL" in preview.json()["error"]["message"]


def test_make_demo_walks_the_customer_journey(
    make_run: tuple[str, subprocess.Popen[bytes], Path],
) -> None:
    url, _, _ = make_run
    done = subprocess.run(
        [sys.executable, str(ROOT / "deploy" / "demo.py"), "--base-url", url],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "steps passed" in done.stdout


def test_ctrl_c_stops_the_server_and_every_worker(
    make_run: tuple[str, subprocess.Popen[bytes], Path],
) -> None:
    url, process, log = make_run
    os.killpg(process.pid, signal.SIGINT)

    deadline = time.monotonic() + 60
    while _group_alive(process.pid, process) and time.monotonic() < deadline:
        time.sleep(0.5)

    assert not _group_alive(process.pid, process), log.read_text()[-4000:]
    with pytest.raises(httpx.HTTPError):
        httpx.get(url + "/healthz", timeout=2)


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
