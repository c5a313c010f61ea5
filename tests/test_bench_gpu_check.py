"""bench/gpu_check.py: the GPU path's one-run check. Here (no CUDA) it must say so and
exit 0; with --allow-cpu it runs every step on the CPU, so the script a lent accelerator
runs is known to work before it is lent."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.py"


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=ROOT,
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA machine measures for real")
def test_without_cuda_it_says_so_and_exits_0() -> None:
    done = run()
    assert done.returncode == 0, done.stderr
    assert "no CUDA device" in done.stdout


def test_every_step_runs_on_the_cpu_with_allow_cpu(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    done = run("--allow-cpu", "--output", str(out))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    steps = result["steps"]
    assert set(steps) == {"fine_tune_lora", "compression_quantize", "inference"}
    assert not [name for name, step in steps.items() if "error" in step]
    train = steps["fine_tune_lora"]
    assert train["device"] == "cpu"
    assert train["trained_tokens"] > 0
    assert train["steps"] > 0
    assert steps["compression_quantize"]["ratios"]["size"] < 0.5  # int8 weights
    names = {row["name"] for row in steps["inference"]["rows"]}
    assert {"engine c=1", "engine c=32"} <= names
