"""The GPU path in one short run: a LoRA fine-tune in bf16, a compression job and inference
at c=1 and c=32, each through the code the GPU workers run, on the first CUDA device.

    .venv/bin/python bench/gpu_check.py               # on a CUDA machine: <= 5 minutes
    .venv/bin/python bench/gpu_check.py --allow-cpu   # the same steps on the CPU, small:
                                                      # checks the script, measures nothing

Without CUDA (and without --allow-cpu) it says so and exits 0, writing nothing. With CUDA
it writes bench/results/gpu.json (the device, torch and CUDA versions, and each step's
figures); quote them in the README with the date of the run.

The steps, in this process, no control plane:
1. a Llama-shaped model built locally (`gpuworkers.models.tiny`, hidden 512 x 8 layers on
   CUDA; 64 x 2 with --allow-cpu) with its trained tokenizer;
2. `gpuworkers.training.engine.run_training` on chat rows, LoRA r=16 on the attention
   projections: the worker's own loop, which trains in bf16 where the GPU has it (the
   `started` report names the device; the JSON says whether bf16 was used). Reported:
   trained tokens/s from the engine's last progress report, first and last train loss;
3. `gpuworkers.compression.runner.run_compression`, method quantize (`bf16` weights on
   CUDA, `int8` on the CPU), on that model: the report's size, latency and quality ratios;
4. the inference `Engine` on the model (`bench/inference_worker.run_engine`): c=1 p50 and
   p99 latency, time to first token streaming, and tokens/s with 32 concurrent callers.
Each step's wall time is in the JSON; a step that fails is recorded with its error and
the script exits 1.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "workers"), str(REPO / "bench")]

import torch  # noqa: E402

from gpuworkers.models import tiny  # noqa: E402
from jobcontracts.compression import CompressionSpec, SourceRef  # noqa: E402
from jobcontracts.inference import ModelRef  # noqa: E402
from jobcontracts.training import (  # noqa: E402
    BaseModelRef,
    DataRef,
    Hyperparameters,
    LoraConfig,
    Report,
    TrainingSpec,
)

RESULTS = REPO / "bench" / "results" / "gpu.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--allow-cpu",
        action="store_true",
        help="run the steps on the CPU with a small model (checks the script; no figures kept)",
    )
    p.add_argument("--rows", type=int, default=None, help="chat rows (CUDA 2048, CPU 32)")
    p.add_argument("--tokens", type=int, default=64, help="tokens per inference request (64)")
    p.add_argument("--repeats", type=int, default=None, help="c=1 requests (CUDA 30, CPU 3)")
    p.add_argument("--output", type=Path, default=None, help=f"JSON path (CUDA: {RESULTS})")
    return p.parse_args(argv)


def chat_rows(count: int) -> list[dict[str, Any]]:
    lines = list(tiny.corpus(count * 2, seed=11))
    return [
        {
            "messages": [
                {"role": "user", "content": lines[2 * i]},
                {"role": "assistant", "content": lines[2 * i + 1]},
            ]
        }
        for i in range(count)
    ]


class Collected:
    def __init__(self) -> None:
        self.items: list[Report] = []

    def __call__(self, report: Report) -> None:
        self.items.append(report)

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [r.data for r in self.items if r.kind == kind]


def train(work: Path, model: Path, rows: int, cuda: bool) -> dict[str, Any]:
    from gpuworkers.training.engine import run_training

    data = work / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in chat_rows(rows)))
    spec = TrainingSpec(
        job_id="ftjob-gpu-check",
        attempt=1,
        organization_id="org-gpu-check",
        task="causal_lm",
        method="supervised",
        base_model=BaseModelRef("gpu-check-llama", model.as_uri(), "llama", 256),
        training_data=DataRef(data.as_uri(), "chat"),
        validation_data=None,
        hyperparameters=Hyperparameters(
            n_epochs=1,
            batch_size=16 if cuda else 4,
            learning_rate=2e-3,
            max_seq_len=256,
            seed=7,
        ),
        output_uri=(work / "train-out").as_uri(),
        control_uri=(work / "control" / "signal.json").as_uri(),
        adapter=LoraConfig(r=16, alpha=32),
        checkpoint_every_steps=0,
        heartbeat_seconds=30.0,
        control_poll_seconds=5.0,
    )
    spec.check()
    reports = Collected()
    started = time.perf_counter()
    outcome = run_training(spec, reports)
    wall = time.perf_counter() - started
    if outcome.status != "succeeded":
        raise RuntimeError(f"training ended {outcome.status}: {reports.of('failed')}")
    progress = reports.of("progress")
    first = reports.of("started")[0]
    return {
        "wall_seconds": round(wall, 2),
        "device": first.get("device"),
        "bf16": bool(cuda and torch.cuda.is_bf16_supported()),
        "steps": progress[-1]["step"],
        "trained_tokens": progress[-1].get("trained_tokens"),
        "tokens_per_second": progress[-1].get("tokens_per_second"),
        "train_loss_first": progress[0].get("train_loss"),
        "train_loss_last": progress[-1].get("train_loss"),
    }


def compress(work: Path, model: Path, cuda: bool) -> dict[str, Any]:
    from gpuworkers.compression.runner import run_compression

    weights = "bf16" if cuda else "int8"
    spec = CompressionSpec(
        job_id="cmpjob-gpu-check",
        attempt=1,
        organization_id="org-gpu-check",
        task="causal_lm",
        method="quantize",
        source=SourceRef(name="gpu-check-llama", uri=model.as_uri(), family="llama"),
        options={"weights": weights},
        output_uri=(work / "compress-out").as_uri(),
        control_uri=(work / "control" / "compress.json").as_uri(),
        seed=7,
    )
    reports = Collected()
    started = time.perf_counter()
    outcome = run_compression(spec, reports)
    wall = time.perf_counter() - started
    if outcome.status != "succeeded":
        raise RuntimeError(f"compression ended {outcome.status}: {reports.of('failed')}")
    done = reports.of("succeeded")[-1]
    report = done.get("report") or {}
    return {
        "wall_seconds": round(wall, 2),
        "weights": weights,
        "device": (reports.of("started") or [{}])[0].get("device"),
        "ratios": report.get("ratios"),
    }


def serve(model: Path, tokens: int, repeats: int) -> dict[str, Any]:
    from inference_worker import run_engine

    ref = ModelRef(
        id="gpu-check-llama",
        base_name="gpu-check-llama",
        base_uri=model.as_uri(),
        family="llama",
        task="causal_lm",
        context_length=256,
    )
    started = time.perf_counter()
    rows = run_engine(ref, tokens, repeats)
    return {
        "wall_seconds": round(time.perf_counter() - started, 2),
        "rows": [
            {k: (round(v, 2) if isinstance(v, float) else v) for k, v in r.items()} for r in rows
        ],
    }


def device_info(cuda: bool) -> dict[str, Any]:
    info: dict[str, Any] = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cuda": torch.version.cuda,
    }
    if cuda:
        props = torch.cuda.get_device_properties(0)
        info.update(
            name=props.name,
            memory_gib=round(props.total_memory / 2**30, 1),
            capability=f"{props.major}.{props.minor}",
            bf16=torch.cuda.is_bf16_supported(),
        )
    else:
        info["name"] = "cpu (--allow-cpu: a check of the script, not a measurement)"
    return info


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.allow_cpu:
        print("gpu_check: no CUDA device here; nothing to measure (exit 0).")
        print("Run it on a CUDA machine, or with --allow-cpu to check the script on the CPU.")
        return 0
    rows = args.rows or (2048 if cuda else 32)
    repeats = args.repeats or (30 if cuda else 3)
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    result: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "device": device_info(cuda),
        "steps": {},
    }
    failed = False
    try:
        hidden, layers = (512, 8) if cuda else (64, 2)
        model = tiny.build("llama", work / "model", hidden=hidden, layers=layers)
        result["model"] = {"family": "llama", "hidden": hidden, "layers": layers}
        for name, step in (
            ("fine_tune_lora", lambda: train(work, model, rows, cuda)),
            ("compression_quantize", lambda: compress(work, model, cuda)),
            ("inference", lambda: serve(model, args.tokens, repeats)),
        ):
            print(f"== {name}", flush=True)
            try:
                result["steps"][name] = step()
            except Exception as error:  # recorded, and the run goes on to the next step
                failed = True
                result["steps"][name] = {"error": f"{type(error).__name__}: {error}"}
                traceback.print_exc()
            print(json.dumps(result["steps"][name], indent=2), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    output = args.output or (RESULTS if cuda else None)
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {output}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
