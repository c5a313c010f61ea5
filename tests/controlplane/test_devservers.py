"""`make run`'s private PostgreSQL and Redis (controlplane.devservers), started for real
from their wheels: data kept across restarts, what a crash leaves cleared, one run
per data directory, and nothing started for a service the environment names."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import psycopg
import pytest
import redis

from controlplane import devservers

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return tmp_path / "data"


def _gone(pid: int, timeout: float = 15) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.1)
    return False


def test_the_private_servers_keep_their_data_and_ports_across_restarts(data: Path) -> None:
    with devservers.running(data, {}) as first:
        urls = dict(first.env)
        with psycopg.connect(urls["DATABASE_URL"], autocommit=True) as conn:
            conn.execute("CREATE TABLE kept (value text)")
            conn.execute("INSERT INTO kept VALUES ('made in the first run')")
        redis.Redis.from_url(urls["REDIS_URL"]).set("kept", "also")
        pids = [server.pid for server in first.servers]
    assert all(_gone(pid) for pid in pids)

    with devservers.running(data, {}) as second:
        assert second.env == urls  # the same ports and passwords: clients' URLs still work
        with psycopg.connect(second.env["DATABASE_URL"]) as conn:
            assert conn.execute("SELECT value FROM kept").fetchall() == [("made in the first run",)]
        assert redis.Redis.from_url(second.env["REDIS_URL"]).get("kept") == b"also"
        assert devservers.private_urls(data) == urls


def test_the_servers_listen_on_loopback_and_refuse_a_wrong_password(data: Path) -> None:
    with devservers.running(data, {}) as servers:
        url = servers.env["REDIS_URL"]
        assert "@127.0.0.1:" in url
        assert ":6379/" not in url
        assert "@127.0.0.1:" in servers.env["DATABASE_URL"]
        assert ":5432/" not in servers.env["DATABASE_URL"]
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(host="127.0.0.1", port=port, password="wrong").ping()
        pg = servers.env["DATABASE_URL"].replace("atelier:", "atelier:wrong", 1)
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            psycopg.connect(pg)


def test_a_killed_run_takes_its_servers_along_and_the_next_run_starts(data: Path) -> None:
    code = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from controlplane import devservers\n"
        "found = devservers.start(Path(sys.argv[1]), {})\n"
        "print(*[s.pid for s in found.servers], flush=True)\n"
        "time.sleep(600)\n"
    )
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'platform'}:{ROOT / 'workers'}"}
    child = subprocess.Popen(
        [sys.executable, "-c", code, str(data)], env=env, stdout=subprocess.PIPE
    )
    assert child.stdout is not None
    pids = [int(pid) for pid in child.stdout.readline().split()]
    assert len(pids) == 2
    child.kill()  # no cleanup runs: SIGKILL
    child.wait()
    assert all(_gone(pid) for pid in pids), "a server outlived the run that started it"

    with (
        devservers.running(data, {}) as servers,
        psycopg.connect(servers.env["DATABASE_URL"]) as conn,
    ):
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_a_stale_postmaster_pid_is_cleared(data: Path) -> None:
    with devservers.running(data, {}) as servers:
        postgres = servers.servers[0]
        assert postgres.name == "postgres"
        os.kill(postgres.pid, signal.SIGKILL)  # dies without removing postmaster.pid
        postgres.process.wait()
    pid_file = data / "postgres" / "postmaster.pid"
    assert pid_file.exists()
    # The pid it names now belongs to someone else (this test), as after a reboot.
    lines = pid_file.read_text().splitlines()
    pid_file.write_text("\n".join([str(os.getpid()), *lines[1:]]) + "\n")

    with (
        devservers.running(data, {}) as servers,
        psycopg.connect(servers.env["DATABASE_URL"]) as conn,
    ):
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_a_second_run_on_the_same_data_directory_is_refused(data: Path) -> None:
    with (
        devservers.running(data, {}),
        pytest.raises(devservers.DevServerError, match="Another `make run` is using"),
    ):
        devservers.start(data, {})


def test_nothing_starts_for_services_the_environment_names(data: Path) -> None:
    named = {"DATABASE_URL": "postgres://elsewhere/db", "REDIS_URL": "redis://elsewhere/0"}
    with devservers.running(data, named) as servers:
        assert servers.servers == []
        assert servers.env == {}
    with devservers.running(data, {"DATABASE_URL": "postgres://elsewhere/db"}) as servers:
        assert [s.name for s in servers.servers] == ["redis"]
        assert set(servers.env) == {"REDIS_URL"}
