"""Started with no DJANGO_SETTINGS_MODULE, every entry point gets the production settings,
which refuse to start without their required variables (`make run` picks the local ones,
and gives them its private PostgreSQL and Redis)."""

from __future__ import annotations

import secrets
import string
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

ENTRY_POINTS = {
    "manage.py": [sys.executable, "platform/manage.py", "check"],
    "atelier manage": [str(BIN / "atelier"), "manage", "check"],
    "asgi": [sys.executable, "-c", "import controlplane.asgi"],
    "celery": [
        sys.executable,
        "-c",
        "from controlplane.celery import app; app.loader.import_default_modules()",
    ],
}


def run_bare(tmp_path: Path, argv: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    """`argv` with nothing configured: no settings module, secret, hosts or services."""
    return subprocess.run(
        argv,
        cwd=ROOT,
        env={
            "PATH": f"{BIN}:/usr/bin:/bin",
            "PYTHONPATH": f"{ROOT / 'platform'}:{ROOT / 'workers'}",
            "ATELIER_DATA_DIR": str(tmp_path),
            **env,
        },
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_with_no_settings_module_the_entry_point_refuses_to_start_without_a_secret_key(
    tmp_path: Path, entry: str
) -> None:
    done = run_bare(tmp_path, ENTRY_POINTS[entry])
    assert done.returncode != 0, done.stdout + done.stderr
    assert "SECRET_KEY must be set in production" in done.stderr


def test_with_a_secret_key_but_no_allowed_hosts_it_names_allowed_hosts(tmp_path: Path) -> None:
    key = "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(60))
    done = run_bare(tmp_path, ENTRY_POINTS["manage.py"], SECRET_KEY=key)
    assert done.returncode != 0, done.stdout + done.stderr
    assert "ALLOWED_HOSTS must be set in production" in done.stderr


def test_the_local_settings_start_on_the_urls_make_run_gives_them(tmp_path: Path) -> None:
    done = run_bare(
        tmp_path,
        ENTRY_POINTS["manage.py"],
        DJANGO_SETTINGS_MODULE="controlplane.settings.local",
        DATABASE_URL="postgres://postgres@127.0.0.1:9/never-reached",
        REDIS_URL="redis://127.0.0.1:9/0",
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "no issues" in done.stdout


def test_the_local_settings_without_make_run_name_the_database_url(tmp_path: Path) -> None:
    done = run_bare(
        tmp_path,
        ENTRY_POINTS["manage.py"],
        DJANGO_SETTINGS_MODULE="controlplane.settings.local",
        REDIS_URL="redis://127.0.0.1:9/0",
    )
    assert done.returncode != 0, done.stdout + done.stderr
    assert "DATABASE_URL is not set. `make run` starts a private PostgreSQL" in done.stderr


def test_a_sqlite_database_url_is_refused(tmp_path: Path) -> None:
    done = run_bare(
        tmp_path,
        ENTRY_POINTS["manage.py"],
        DJANGO_SETTINGS_MODULE="controlplane.settings.local",
        DATABASE_URL=f"sqlite:///{tmp_path / 'db.sqlite3'}",
        REDIS_URL="redis://127.0.0.1:9/0",
    )
    assert done.returncode != 0, done.stdout + done.stderr
    assert "DATABASE_URL must name a PostgreSQL database" in done.stderr
