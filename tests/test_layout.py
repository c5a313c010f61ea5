"""The repository layout: `platform/` and `workers/` are source roots, never packages.

A package named `platform` would shadow Python's standard `platform` module,
which uuid, Django, Celery, redis-py and torch all import (ARCHITECTURE.md §2).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCE_ROOTS = ("platform", "workers")
PACKAGES = {"controlplane": "platform", "gpuworkers": "workers", "jobcontracts": "workers"}

#: What the top level holds. Dot entries (.gitignore, .ci, .venv, ...) and
#: anything git ignores (build output such as *.egg-info) come on top.
TOP_LEVEL = {
    "pyproject.toml",
    "README.md",
    "Makefile",
    "docker-compose.yml",
    "platform",
    "workers",
    "tests",
    "deploy",
    "bench",
    ".ci",
}

# Started from the repository root with both source roots on the path: the
# situation in which a `platform` package would win over the standard module.
PROBE = """
import json, platform, sys, sysconfig, uuid
import celery.platforms, django
import controlplane, gpuworkers, jobcontracts

print(json.dumps({
    "platform": platform.__file__,
    "python_version": platform.python_version(),
    "stdlib": sysconfig.get_paths()["stdlib"],
    "uuid": str(uuid.uuid4()),
    "packages": {m.__name__: m.__file__ for m in (controlplane, gpuworkers, jobcontracts)},
}))
"""


def is_relative_to(path: str, folder: str | Path) -> bool:
    return Path(path).resolve().is_relative_to(Path(folder).resolve())


@pytest.mark.parametrize("source_root", SOURCE_ROOTS)
def test_source_root_is_not_a_package(source_root: str) -> None:
    assert (ROOT / source_root).is_dir()
    assert not (ROOT / source_root / "__init__.py").exists()


def test_nothing_at_the_top_level_shadows_the_standard_platform_module() -> None:
    assert not (ROOT / "platform.py").exists()
    assert not (ROOT / "__init__.py").exists()


def test_standard_platform_module_is_imported_from_the_repository_root() -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        ["platform", "workers", str(ROOT / "platform"), str(ROOT / "workers")]
    )
    result = subprocess.run(
        [sys.executable, "-c", PROBE],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    probe = json.loads(result.stdout.strip().splitlines()[-1])

    assert is_relative_to(probe["platform"], probe["stdlib"]), probe["platform"]
    assert probe["python_version"] == platform.python_version()
    for package, source_root in PACKAGES.items():
        assert is_relative_to(probe["packages"][package], ROOT / source_root / package), package


def test_standard_platform_module_is_imported_by_the_test_run() -> None:
    assert is_relative_to(platform.__file__, sysconfig.get_paths()["stdlib"])


def test_top_level_holds_exactly_the_expected_entries() -> None:
    git = subprocess.run(
        ["git", "rev-parse", "--is-inside-work-tree"], cwd=ROOT, capture_output=True, text=True
    )
    if git.returncode != 0:
        pytest.skip("not a git work tree: cannot tell ignored build output apart")
    entries = sorted(p.name for p in ROOT.iterdir())
    ignored = subprocess.run(
        ["git", "check-ignore", "--", *entries], cwd=ROOT, capture_output=True, text=True
    )
    assert ignored.returncode in {0, 1}, ignored.stderr  # 1: nothing ignored
    visible = set(entries) - set(ignored.stdout.splitlines())

    assert {e for e in visible if not e.startswith(".")} == {
        e for e in TOP_LEVEL if not e.startswith(".")
    }
    assert {e for e in TOP_LEVEL if e.startswith(".")} <= visible


def test_models_and_migrations_agree(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "controlplane.settings.test",
        # No server needed to compare models with migrations.
        "DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite3'}",
    }
    done = subprocess.run(
        [sys.executable, "-m", "django", "makemigrations", "--check", "--dry-run"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=env,
    )
    assert done.returncode == 0, done.stdout + done.stderr
