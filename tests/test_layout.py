"""The repository layout: `platform/` and `workers/` are source roots, never packages;
the control plane's apps are layered and import each other at module level only.

A package named `platform` would shadow Python's standard `platform` module,
which uuid, Django, Celery, redis-py and torch all import (ARCHITECTURE.md, "Layout").
"""

from __future__ import annotations

import ast
import json
import os
import platform
import subprocess
import sys
import sysconfig
from collections.abc import Iterator
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
    "ARCHITECTURE.md",
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


def test_models_and_migrations_agree() -> None:
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "controlplane.settings.test"}
    done = subprocess.run(
        [sys.executable, "-m", "django", "makemigrations", "--check", "--dry-run"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=env,
    )
    assert done.returncode == 0, done.stdout + done.stderr


CONTROLPLANE = ROOT / "platform" / "controlplane"

#: Function-local imports of control-plane modules that are allowed, (file, module) -> why.
#: An app imports the apps below it at module level (pyproject's layers contract); a lower
#: app that must reach an upper one sends a signal or calls what that one registered, and
#: AppConfig.ready() wiring is allowed everywhere. Lazy imports are for optional or heavy
#: dependencies, never for dodging an import cycle between apps.
LAZY_IMPORTS_ALLOWED = {
    ("cli.py", "controlplane.devservers"): "the `run` extra (psutil, server wheels) that only "
    "`make run` installs, never production images",
}


def function_local_imports(path: Path, module: str) -> Iterator[tuple[int, str]]:
    """(line, absolute name) of each control-plane import inside a function of `path`
    (the source of `module`), relative ones resolved; `AppConfig.ready()` is skipped."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    seen: set[tuple[int, str]] = set()
    for function in ast.walk(tree):
        if not isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        if path.name == "apps.py" and function.name == "ready":
            continue
        for node in ast.walk(function):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = package.rsplit(".", node.level - 1)[0] if node.level else ""
                target = ".".join(part for part in (base, node.module or "") if part)
                if target.count(".") == 0 or not node.module:  # `from pkg import module`
                    names = [f"{target}.{alias.name}" for alias in node.names]
                else:
                    names = [target]
            else:
                continue
            seen.update((node.lineno, n) for n in names if n.split(".")[0] == "controlplane")
    yield from sorted(seen)


def app_of(name: str) -> str:
    """`controlplane.billing.ledger` -> `billing`; top-level modules are their own part."""
    return name.split(".")[1] if "." in name else name


def test_no_app_imports_another_inside_a_function() -> None:
    found = []
    for path in sorted(CONTROLPLANE.rglob("*.py")):
        relative = path.relative_to(CONTROLPLANE)
        if "migrations" in relative.parts:
            continue
        parts = relative.with_suffix("").parts
        module = ".".join(("controlplane", *(parts[:-1] if parts[-1] == "__init__" else parts)))
        for line, name in function_local_imports(path, module):
            if app_of(name) == app_of(module) or (str(relative), name) in LAZY_IMPORTS_ALLOWED:
                continue
            found.append(f"{relative}:{line}: {name}")
    assert found == [], "import these at module level, or invert the dependency: " + str(found)


def test_function_local_imports_are_found_and_resolved(tmp_path: Path) -> None:
    probe = tmp_path / "files.py"
    probe.write_text(
        "from controlplane.core import ids\n"
        "def f():\n"
        "    from controlplane.inference.deployments import x\n"
        "    import controlplane.billing.ledger\n"
        "    from ...jobs import reports\n"
        "    from ..tasks import validate\n"
        "    from controlplane import devservers\n"
        "    from tokenizers import Tokenizer\n"
    )
    found = list(function_local_imports(probe, "controlplane.datasets.services.files"))
    assert found == [
        (3, "controlplane.inference.deployments"),
        (4, "controlplane.billing.ledger"),
        (5, "controlplane.jobs"),
        (6, "controlplane.datasets.tasks"),
        (7, "controlplane.devservers"),
    ]
    assert [app_of(name) for _, name in found] == [
        "inference",
        "billing",
        "jobs",
        "datasets",
        "devservers",
    ]


def test_import_contracts_hold() -> None:
    """pyproject's import-linter contracts, the apps' layers among them (also `make lint`)."""
    done = subprocess.run(
        [str(Path(sys.executable).parent / "lint-imports"), "--no-cache"],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(["platform", "workers"])},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
