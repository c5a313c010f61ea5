"""Real server and worker processes for end-to-end tests, stopped by their own pid."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
from django.conf import settings

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_env(**extra: str) -> dict[str, str]:
    """The environment of the test process, pointed at the test database."""
    db = settings.DATABASES["default"]
    env = dict(os.environ)
    env.update(
        DJANGO_SETTINGS_MODULE="controlplane.settings.test",
        DATABASE_URL=f"postgres://{db['USER']}@{db['HOST']}:{db['PORT']}/{db['NAME']}",
        REDIS_URL=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/15"),
        LOG_FORMAT="json",
        LOG_LEVEL="INFO",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


@dataclass
class Server:
    url: str
    log: Path
    process: subprocess.Popen[bytes]

    def log_lines(self) -> list[str]:
        return self.log.read_text().splitlines()


@contextmanager
def asgi_server(tmp: Path, **env: str) -> Iterator[Server]:
    """`atelier web` (uvicorn, ASGI) on a free loopback port."""
    port = free_port()
    tmp.mkdir(parents=True, exist_ok=True)
    log = tmp / "web.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [str(BIN / "atelier"), "web"],
            env=test_env(HOST="127.0.0.1", PORT=str(port), **env),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    server = Server(url=f"http://127.0.0.1:{port}", log=log, process=process)
    try:
        _wait_http(server)
        yield server
    finally:
        stop(process)


def _wait_http(server: Server, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"server exited early:\n{server.log.read_text()[-3000:]}")
        try:
            if httpx.get(server.url + "/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.2)
    raise RuntimeError(f"server did not answer in {timeout}s:\n{server.log.read_text()[-3000:]}")


@contextmanager
def worker(kind: str, tmp: Path, **env: str) -> Iterator[subprocess.Popen[bytes]]:
    """`atelier worker <kind>` (a real Celery worker) until the block ends."""
    tmp.mkdir(parents=True, exist_ok=True)
    log = tmp / f"{kind}.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [str(BIN / "atelier"), "worker", kind],
            env=test_env(**env),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        yield process
    finally:
        stop(process)


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)
