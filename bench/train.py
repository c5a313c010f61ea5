"""Fine-tuning: a bare PyTorch loop against the same job through the platform.

    .venv/bin/python bench/train.py             # ~2.5 min on 2 cores: 3 rounds of each
    .venv/bin/python bench/train.py --quick     # ~45 s: one round of a 6-step job
    .venv/bin/python bench/train.py --help      # model size, rows, batch, adapter, threads…
    .venv/bin/python bench/train.py --peer trl  # ~2.5 min: against TRL's SFTTrainer instead
                                                # (pip install -e '.[bench]'
                                                #  -c deploy/constraints-cpu.txt)

The same model, rows and hyperparameters are trained both ways, in one run:

- bare: one Python process of its own, torch + transformers + peft and nothing of
  the platform's. Like a running GPU worker it imports once and warms up on a small
  run; then, each round, it loads the model with `from_pretrained`, wraps it with
  PEFT's LoRA (or not: `--adapter full`), tokenizes the chat rows and trains with a
  plain loop (AdamW, linear decay, gradient clipping);
- platform: `POST /v1/fine_tuning/jobs` to the real server (`atelier web`), which
  counts the tokens on the control worker (`atelier worker control`) and dispatches
  through Redis to a GPU worker (`atelier worker gpu`, on CPU here), which trains
  with the engine, reports progress back through the control queue, and writes the
  artifact to storage (local files here).

Both do the same work: the same token ids (the chat template rendered, assistant turns
learned, truncated as the engine truncates), the same batches in the same order (the
engine's default, length-grouped: `grouped_batches`), the same LoRA config, optimizer
and steps, on the same number of CPU threads; the bench checks that both trained the
same tokens and ended at the same loss. Tokens/s counts non-padding tokens per second of
training loop, from the end of step 1 to the end of the last step; for the platform,
from the worker's own progress reports. Submit-to-first-step runs from the moment the
POST returns to the end of step 1 on the worker (the job's `first_step_at`), after a
warm-up job (the GPU worker imports torch when its pool process starts and a running
worker has done its first job long ago: neither is counted).

With `--peer trl` the bare loop's place is taken by TRL's `SFTTrainer` (`train.py --trl`,
a process of its own, warmed up the same way): the same model and LoRA init, the
engine's token ids and labels as a pre-tokenized dataset, the same batch size,
learning rate, schedule, clipping, optimizer, steps and max length, and TRL's own
length-grouped sampler (`train_sampling_strategy="group_by_length"`); both sides get
validation rows, evaluated at each epoch's end, and the table shows non-padding
tokens/s and the final validation loss (bench/results/train_peers.json).

Rounds alternate which side goes first (bare, platform, platform, bare, bare,
platform) and each side counts its best round (on a shared machine interference only
ever slows a run down). It prints a table and writes
bench/results/train.json. Only loopback is used; the temp directory, the database
(`atelier_bench_train`) and the Redis keys it created (db 9) are removed, and the
processes it started are stopped by their pid.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import itertools
import json
import math
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psycopg

# Shared rather than copied: the stack (throw-away database, server and workers as
# subprocesses, /proc readings) and the api_auth benchmark's helpers (sign-up,
# report metadata). This directory is on sys.path when the script runs.
from _stack import (
    Stack,
    cpu_seconds,
    manage,
    platform_database,
    started_stack,
    steal_seconds,
    tree_cpu,
)
from api_auth import HOST, REPO, git_commit, machine_busy_seconds, machine_info, sign_up, tail

TARGET_RATIO = 0.9  # platform tokens/s >= 0.9 x the bare loop's
TARGET_FIRST_STEP_S = 3.0  # POST returned -> end of step 1 on the worker, idle machine
#: The platform cuts sequences to the base model's context, and never longer than this
#: (controlplane.jobs.dispatch.MAX_SEQ_LEN).
PLATFORM_MAX_SEQ_LEN = 2048
#: Learning rate at multiplier 1.0 (controlplane.jobs.params.BASE_LEARNING_RATE); the
#: bench checks it against what the API reports for the warm-up job.
BASE_LEARNING_RATE = {"lora": 2e-4, "full": 5e-5}
#: LoRA targets the engine picks for a Llama when the job names none.
LORA_TARGETS = ["q_proj", "v_proj"]
MODEL_NAME = "bench-llama"
TERMINAL = ("succeeded", "failed", "cancelled")

# ---------------------------------------------------------------- options


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    model = p.add_argument_group("model (built with gpuworkers.models.tiny, Llama family)")
    model.add_argument("--hidden", type=int, default=256, help="hidden size (default 256)")
    model.add_argument("--layers", type=int, default=4, help="layers (default 4)")
    model.add_argument("--context", type=int, default=256, help="context length (default 256)")
    job = p.add_argument_group("data and hyperparameters")
    job.add_argument("--rows", type=int, default=None, help="chat rows (default 160; --quick 48)")
    job.add_argument("--epochs", type=int, default=None, help="n_epochs (default 2; --quick 1)")
    job.add_argument("--batch-size", type=int, default=8, help="batch_size (default 8)")
    job.add_argument(
        "--lr-multiplier", type=float, default=1.0, help="learning_rate_multiplier (default 1)"
    )
    job.add_argument("--adapter", choices=("lora", "full"), default="lora", help="default lora")
    job.add_argument("--lora-r", type=int, default=8, help="LoRA rank (default 8)")
    job.add_argument("--lora-alpha", type=int, default=16, help="LoRA alpha (default 16)")
    job.add_argument("--seed", type=int, default=42, help="job seed (default 42)")
    p.add_argument("--quick", action="store_true", help="48 rows, 1 epoch, 1 round: a smoke run")
    p.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="rounds of bare + platform, alternating which goes first; each side counts its best "
        "round (default 3; --quick 1)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads for training, on both sides (TORCH_NUM_THREADS for the GPU worker); "
        "0 = every core this process may use, the engine's default (default 1: see "
        "bench/README.md)",
    )
    p.add_argument(
        "--warmup-rows", type=int, default=16, help="rows of the warm-up job (default 16)"
    )
    p.add_argument(
        "--poll", type=float, default=1.0, help="seconds between GETs of a running job (1)"
    )
    p.add_argument(
        "--postgres",
        default=os.environ.get("BENCH_POSTGRES_URL", "postgres://postgres@127.0.0.1:5432"),
        help="PostgreSQL server (no database part); env BENCH_POSTGRES_URL",
    )
    p.add_argument(
        "--database",
        default="atelier_bench_train",
        help="database to create, use and drop (default atelier_bench_train)",
    )
    p.add_argument(
        "--redis",
        default=os.environ.get("BENCH_TRAIN_REDIS_URL", "redis://127.0.0.1:6379/9"),
        help="Redis for the cache, broker and results (default db 9: the tests use 15, "
        "api_auth 14, ingest 13); env BENCH_TRAIN_REDIS_URL",
    )
    p.add_argument(
        "--workers", type=int, default=1, help="server processes, WEB_CONCURRENCY (default 1)"
    )
    p.add_argument("--tmpdir", type=Path, default=None, help="where the temp directory goes")
    p.add_argument(
        "--keep-logs",
        type=Path,
        default=None,
        help="copy the server's and workers' logs to this directory at the end",
    )
    p.add_argument(
        "--output",
        type=Path,
        default=None,
        help="JSON results file (default bench/results/train.json; with --peer "
        "bench/results/train_peers.json)",
    )
    p.add_argument(
        "--settings",
        default="controlplane.settings.local",
        help="DJANGO_SETTINGS_MODULE for server and workers (default controlplane.settings.local)",
    )
    p.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra environment for server and workers, e.g. --env "
        "JOBS_CHECKPOINT_EVERY_STEPS=10 (repeatable)",
    )
    p.add_argument("--check", action="store_true", help="exit 1 unless every target is met")
    peer = p.add_argument_group("against a peer (instead of the bare loop)")
    peer.add_argument(
        "--peer",
        choices=("trl",),
        default=None,
        help="trl: the same job through TRL's SFTTrainer (the `bench` extra) and through the "
        "platform, both evaluated on validation rows; writes bench/results/train_peers.json",
    )
    peer.add_argument(
        "--valid-rows", type=int, default=32, help="validation rows with --peer (default 32)"
    )
    peer.add_argument(
        "--trl-logging-steps",
        type=int,
        default=10,
        help="TRL's logging_steps (default 10, SFTConfig's own default)",
    )
    args = p.parse_args(argv)
    if args.output is None:
        name = "train_peers.json" if args.peer else "train.json"
        args.output = REPO / "bench" / "results" / name
    args.rows = args.rows or (48 if args.quick else 160)
    args.epochs = args.epochs or (1 if args.quick else 2)
    args.rounds = args.rounds or (1 if args.quick else 3)
    for item in args.env:
        if "=" not in item:
            p.error(f"--env takes NAME=VALUE, not {item!r}")
    if args.threads < 0:
        p.error("--threads must be 0 (every core) or more")
    if min(args.rows, args.epochs, args.batch_size, args.rounds, args.warmup_rows) < 1:
        p.error("--rows, --epochs, --batch-size, --rounds and --warmup-rows must be positive")
    if args.warmup_rows > args.rows:
        p.error("--warmup-rows must not exceed --rows")
    return args


# ---------------------------------------------------------------- the data


#: Words of the tiny models' tokenizer corpus (most become one token) and some it never
#: saw (split into several), so rows tokenize like real text: mostly whole words.
def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


COMMON = _words(
    "the model learns from data and the customer owns the result a dataset of chat messages "
    "trains an assistant to answer questions about orders invoices refunds shipping returns "
    "accounts passwords billing plans usage tokens latency errors please thank you hello how "
    "can i help today your order has shipped it will arrive on monday the invoice is attached "
    "we are sorry for the delay our team will call you back"
)
RARE = _words(
    "warehouse courier tracking parcel subscription discount voucher receipt address postcode "
    "weekend tuesday replacement damaged colour size exchange policy"
)


def chat_rows(count: int, seed: int = 7) -> list[dict[str, Any]]:
    """Deterministic support-style chat rows of varied length: a system prompt in 60%,
    one to three user/assistant turns; with the bench model's tokenizer 160 rows are 45 to
    332 tokens, 176 on average, 26 of them longer than a 256-token context (cut, as
    training cuts them), so batches carry padding as real ones do."""
    r = random.Random(seed)

    def text(low: int, high: int) -> str:
        words = [
            r.choice(RARE) if r.random() < 0.08 else r.choice(COMMON)
            for _ in range(r.randint(low, high))
        ]
        return " ".join(words).capitalize() + r.choice(".?!")

    systems = [text(8, 30) for _ in range(12)]
    rows = []
    for _ in range(count):
        messages = []
        if r.random() < 0.6:
            messages.append({"role": "system", "content": r.choice(systems)})
        for _ in range(r.choice((1, 1, 2, 2, 3))):
            messages.append({"role": "user", "content": text(4, 30)})
            messages.append({"role": "assistant", "content": text(8, 60)})
        rows.append({"messages": messages})
    return rows


def write_rows(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def build_model(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """`python -m gpuworkers.models.tiny` (the platform's own builder) into `out`."""
    started = time.perf_counter()
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
            str(args.hidden),
            "--layers",
            str(args.layers),
            "--context",
            str(args.context),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"building the model failed:\n{done.stdout}\n{done.stderr}")
    config = json.loads((out / "config.json").read_text())
    weights = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    return {
        "family": "llama",
        "hidden_size": config["hidden_size"],
        "intermediate_size": config["intermediate_size"],
        "layers": config["num_hidden_layers"],
        "attention_heads": config["num_attention_heads"],
        "kv_heads": config["num_key_value_heads"],
        "context_length": config["max_position_embeddings"],
        "vocab_size": config["vocab_size"],
        "parameters": weights // 4,  # float32 safetensors
        "weights_bytes": weights,
        "build_seconds": round(time.perf_counter() - started, 1),
    }


# ---------------------------------------------------------------- the bare loop (child)


def bare_child(config_path: str) -> int:
    """The bare baseline: a process of its own that, like a running GPU worker, imports
    once, warms up on a small run, then does one whole run (load, tokenize, train) each
    time it reads `run` on stdin, answering one JSON line on stdout."""
    return child(config_path, bare_run, ("peft", "torch", "transformers"))


def child(config_path: str, run: Any, modules: tuple[str, ...]) -> int:
    """A side's process: imports `modules` (timed), warms up with `run` on the small
    file, then one whole `run` per `run` line on stdin, one JSON line each on stdout."""
    import importlib

    out = sys.stdout
    sys.stdout = sys.stderr  # whatever the libraries print stays off the answers
    cfg = json.loads(Path(config_path).read_text())
    begun = time.perf_counter()
    for name in modules:  # imported here to time them; `run` imports what it uses by name
        importlib.import_module(name)
    imported = time.perf_counter() - begun
    warmup = run(cfg, cfg["warmup_path"], 1)
    print(json.dumps({"ready": True, "import_s": imported, "warmup": warmup}), file=out, flush=True)
    for line in sys.stdin:
        if line.strip() != "run":
            break
        print(json.dumps(run(cfg, cfg["data_path"], cfg["n_epochs"])), file=out, flush=True)
    return 0


def bare_run(cfg: dict[str, Any], data_path: str, n_epochs: int) -> dict[str, Any]:
    """Load, tokenize, train: what the engine does for a supervised chat job, written
    plainly with torch + transformers + peft (same token ids and learned-token mask, same
    truncation, same batch order, LoRA config, optimizer, schedule, clipping and steps),
    and none of what the platform adds (reports, control signals, heartbeats,
    checkpoints, the artifact)."""
    import torch
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    begun = time.perf_counter()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    bf16 = cuda and torch.cuda.is_bf16_supported()
    if not cuda:
        torch.set_num_threads(cfg["threads"])
    lora = cfg["adapter"]["type"] == "lora"
    torch.manual_seed(cfg["seed"])  # the LoRA matrices start as the engine's do
    tokenizer = AutoTokenizer.from_pretrained(cfg["model_dir"])
    model = AutoModelForCausalLM.from_pretrained(
        cfg["model_dir"], dtype=torch.bfloat16 if (lora and bf16) else torch.float32
    )
    if lora:
        model = get_peft_model(
            model,
            LoraConfig(
                r=cfg["adapter"]["r"],
                lora_alpha=cfg["adapter"]["alpha"],
                lora_dropout=0.0,
                target_modules=cfg["adapter"]["target_modules"],
                task_type=TaskType.CAUSAL_LM,
            ),
        )
    model.to(device)
    model.train()
    loaded = time.perf_counter()

    max_len = min(cfg["max_seq_len"], model.config.max_position_embeddings)
    if 0 < tokenizer.model_max_length < 1_000_000:
        max_len = min(max_len, tokenizer.model_max_length)
    rows = [json.loads(line) for line in Path(data_path).read_text().splitlines() if line]
    encoded = [encode_chat(tokenizer, row["messages"], max_len) for row in rows]
    sequences = [(ids, learn) for ids, learn, _ in encoded]
    lengths = sorted(length for _, _, length in encoded)
    tokenized = time.perf_counter()

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params, lr=cfg["learning_rate"], weight_decay=0.0, fused=device.type in ("cpu", "cuda")
    )
    per_epoch = math.ceil(len(sequences) / cfg["batch_size"])
    total_steps = per_epoch * n_epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda done: max(0.0, (total_steps - done) / total_steps)
    )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    ends: list[float] = []
    cpus: list[float] = []  # this process's CPU seconds (all threads) at each step's end
    busy: list[float] = []  # the machine's busy CPU seconds at each step's end
    tokens: list[int] = []
    losses: list[float] = []
    trained = padded = 0
    cpu0 = time.process_time()
    start = time.perf_counter()
    row_lengths = [len(ids) for ids, _ in sequences]
    for epoch in range(n_epochs):
        for batch_rows in grouped_batches(row_lengths, cfg["batch_size"], cfg["seed"], epoch):
            rows_now = [sequences[i] for i in batch_rows]
            batch = {k: v.to(device) for k, v in collate(rows_now, pad_id).items()}
            with autocast:
                loss = model(**batch, use_cache=False).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())  # also waits for the GPU, when there is one
            trained += int(batch["attention_mask"].sum())
            padded += batch["attention_mask"].numel()
            tokens.append(trained)
            ends.append(time.perf_counter() - start)
            cpus.append(time.process_time() - cpu0)
            busy.append(machine_busy_seconds())
    return {
        "device": device.type,
        "threads": torch.get_num_threads(),
        "load_s": loaded - begun,
        "tokenize_s": tokenized - loaded,
        "rows": len(sequences),
        "max_len": max_len,
        "learned_tokens_per_epoch": sum(sum(learn) for _, learn in sequences),
        "row_tokens": {
            "mean": round(sum(lengths) / len(lengths), 1),
            "median": lengths[len(lengths) // 2],
            "max": lengths[-1],
            "over_max_len": sum(1 for n in lengths if n > max_len),
        },
        "padding_share": round(1 - trained / padded, 4) if padded else 0.0,
        "trainable_parameters": sum(p.numel() for p in params),
        "total_steps": total_steps,
        "step_ends_s": ends,
        "cumulative_tokens": tokens,
        "losses": losses,
        "step_cpu_s": cpus,
        "step_machine_busy_s": busy,
    }


#: Batches in a mega-batch, at most (the engine's MEGA_BATCH_FACTOR, as HF's sampler).
MEGA_BATCH_FACTOR = 50


def grouped_batches(lengths: list[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The engine's default batch order, written plainly: the epoch's seeded permutation
    cut into mega-batches (MEGA_BATCH_FACTOR batches, or fewer so that an epoch has 4),
    each sorted longest first and cut into batches, then the batches shuffled with the
    same generator."""
    import torch

    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(len(lengths), generator=generator).tolist()
    mega = max(1, min(len(lengths) // (4 * batch_size), MEGA_BATCH_FACTOR)) * batch_size
    batches = []
    for first in range(0, len(order), mega):
        chunk = sorted(order[first : first + mega], key=lambda row: -lengths[row])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    shuffled = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[i] for i in shuffled]


# ---------------------------------------------------------------- TRL's SFTTrainer (child)


def trl_child(config_path: str) -> int:
    """The peer: TRL's `SFTTrainer` in a process of its own, started like the bare loop
    (imports once, warms up on a small run, one whole run per `run` line on stdin)."""
    return child(config_path, trl_run, ("peft", "torch", "transformers", "trl"))


def trl_run(cfg: dict[str, Any], data_path: str, n_epochs: int) -> dict[str, Any]:
    """The same model, token ids, learned-token mask, LoRA config and hyperparameters
    through `trl.SFTTrainer`, with its own length-grouped sampler; evaluated on the
    validation rows at each epoch's end as the engine is, and finally scored on them as
    the engine scores (summed loss over the learned tokens / their count)."""
    import datasets
    import torch
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from transformers.utils import logging as transformers_logging
    from trl import SFTConfig, SFTTrainer

    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    datasets.disable_progress_bars()
    begun = time.perf_counter()
    cuda = torch.cuda.is_available()
    bf16 = cuda and torch.cuda.is_bf16_supported()
    if not cuda:
        torch.set_num_threads(cfg["threads"])
    lora = cfg["adapter"]["type"] == "lora"
    torch.manual_seed(cfg["seed"])  # the LoRA matrices start as the engine's do
    tokenizer = AutoTokenizer.from_pretrained(cfg["model_dir"])
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(
        cfg["model_dir"], dtype=torch.bfloat16 if (lora and bf16) else torch.float32
    )
    if lora:
        model = get_peft_model(
            model,
            LoraConfig(
                r=cfg["adapter"]["r"],
                lora_alpha=cfg["adapter"]["alpha"],
                lora_dropout=0.0,
                target_modules=cfg["adapter"]["target_modules"],
                task_type=TaskType.CAUSAL_LM,
            ),
        )
    loaded = time.perf_counter()
    max_len = min(cfg["max_seq_len"], model.config.max_position_embeddings)
    if 0 < tokenizer.model_max_length < 1_000_000:
        max_len = min(max_len, tokenizer.model_max_length)

    def tokenized(path: str) -> Any:
        rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line]
        encoded = [encode_chat(tokenizer, row["messages"], max_len) for row in rows]
        return datasets.Dataset.from_dict(
            {
                "input_ids": [ids for ids, _, _ in encoded],
                "labels": [
                    [t if m else -100 for t, m in zip(ids, learn, strict=True)]
                    for ids, learn, _ in encoded
                ],
            }
        )

    train_set, valid_set = tokenized(data_path), tokenized(cfg["valid_path"])
    tokenized_at = time.perf_counter()

    counts: list[tuple[Any, int]] = []  # (non-padding, all) tokens of each training batch
    ends: list[float] = []
    cpus: list[float] = []  # this process's CPU seconds (all threads) at each step's end
    losses: list[float] = []

    class Clock(TrainerCallback):  # type: ignore[misc]
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if cuda:
                torch.cuda.synchronize()
            ends.append(time.perf_counter())
            cpus.append(time.process_time())

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    config = SFTConfig(
        output_dir=str(Path(cfg["work_dir"]) / "trl-out"),
        per_device_train_batch_size=cfg["batch_size"],
        per_device_eval_batch_size=cfg["batch_size"],
        gradient_accumulation_steps=1,
        num_train_epochs=n_epochs,
        learning_rate=cfg["learning_rate"],
        lr_scheduler_type="linear",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        optim="adamw_torch_fused",
        seed=cfg["seed"],
        data_seed=cfg["seed"],
        max_length=max_len,
        packing=False,
        padding_free=False,
        gradient_checkpointing=False,
        train_sampling_strategy="group_by_length",
        eval_strategy="epoch" if cfg["eval_each_epoch"] else "no",
        save_strategy="no",
        logging_strategy="steps",
        logging_steps=cfg["trl_logging_steps"],
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        use_cpu=not cuda,
        bf16=bf16 and not lora,
    )

    class CountingTrainer(SFTTrainer):  # type: ignore[misc]
        """Counts each training batch's tokens (as tensors: no extra device sync)."""

        def training_step(self, model: Any, inputs: Any, *args: Any, **kw: Any) -> Any:
            mask = inputs["attention_mask"]
            counts.append((mask.sum(), mask.numel()))
            return super().training_step(model, inputs, *args, **kw)

    trainer = CountingTrainer(
        model=model,
        args=config,
        train_dataset=train_set,
        eval_dataset=valid_set,
        processing_class=tokenizer,
        callbacks=[Clock()],
    )
    start = time.perf_counter()
    trainer.train()
    trained_at = time.perf_counter()
    valid_loss = engine_style_loss(model, tokenizer, valid_set, cfg["batch_size"])
    steps = len(ends)
    if len(counts) != steps:
        raise SystemExit(f"TRL trained {len(counts)} batches in {steps} steps")
    cumulative = list(itertools.accumulate(int(c[0]) for c in counts))
    real = cumulative[-1]
    padded = sum(c[1] for c in counts)
    return {
        "device": "cuda" if cuda else "cpu",
        "threads": torch.get_num_threads(),
        "load_s": loaded - begun,
        "tokenize_s": tokenized_at - loaded,
        "rows": len(train_set),
        "max_len": max_len,
        "padding_share": round(1 - real / padded, 4) if padded else 0.0,
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "total_steps": steps,
        "step_ends_s": [t - start for t in ends],
        "step_cpu_s": cpus,
        "cumulative_tokens": cumulative,
        "losses": losses,
        "train_call_s": trained_at - start,
        "valid_loss": valid_loss,
        "trl_eval_loss": next(
            (
                float(h["eval_loss"])
                for h in reversed(trainer.state.log_history)
                if "eval_loss" in h
            ),
            None,
        ),
        "trl_version": importlib.metadata.version("trl"),
    }


def engine_style_loss(model: Any, tokenizer: Any, rows: Any, batch_size: int) -> float:
    """Validation loss as the engine computes it: the cross-entropy summed over every
    learned token of the validation rows, divided by their count."""
    import torch
    import torch.nn.functional as F

    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    with torch.no_grad():
        for first in range(0, len(rows), batch_size):
            part = rows[first : first + batch_size]
            sequences = [
                (ids, [int(label != -100) for label in labels])
                for ids, labels in zip(part["input_ids"], part["labels"], strict=True)
            ]
            batch = {k: v.to(device) for k, v in collate(sequences, pad_id).items()}
            logits = (
                model(
                    input_ids=batch["input_ids"],
                    attention_mask=batch["attention_mask"],
                    use_cache=False,
                )
                .logits[:, :-1]
                .float()
            )
            labels = batch["labels"][:, 1:]
            total += float(
                F.cross_entropy(
                    logits.reshape(-1, logits.size(-1)), labels.reshape(-1), reduction="sum"
                )
            )
            count += int((labels != -100).sum())
    model.train()
    return total / max(count, 1)


def encode_chat(
    tokenizer: Any, messages: list[dict[str, str]], max_len: int
) -> tuple[list[int], list[int], int]:
    """Token ids of the rendered chat and which of them are learned (the assistant turns,
    with their end-of-turn marker), cut to `max_len` around the first learned token as
    the engine cuts them; and the length before the cut."""
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            before = tokenizer.apply_chat_template(
                messages[:i], tokenize=False, add_generation_prompt=True
            )
            through = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
            spans.append((len(before), len(through)))
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(encoded["input_ids"])
    learn = [
        int(end > start and any(start < b and end > a for a, b in spans))
        for start, end in encoded["offset_mapping"]
    ]
    length = len(ids)
    if length > max_len:
        first = learn.index(1) if 1 in learn else 0
        cut = max(0, min(first - max_len // 2, length - max_len))
        ids, learn = ids[cut : cut + max_len], learn[cut : cut + max_len]
    return ids, learn, length


def collate(sequences: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, Any]:
    import torch

    length = max(len(ids) for ids, _ in sequences)
    input_ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    attention = torch.zeros((len(sequences), length), dtype=torch.long)
    labels = torch.full((len(sequences), length), -100, dtype=torch.long)
    for row, (ids, learn) in enumerate(sequences):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention[row, : len(ids)] = 1
        labels[row, : len(ids)] = torch.tensor(
            [t if m else -100 for t, m in zip(ids, learn, strict=True)]
        )
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


class BareLoop:
    """The bare loop's process (`train.py --bare CONFIG`): started once, warmed up, then
    asked for one run per round; stopped by its pid."""

    mode = "bare"

    def __init__(self, config: dict[str, Any], folder: Path, database: str) -> None:
        self.database = database
        path = folder / f"{self.mode}.json"
        path.write_text(json.dumps(config))
        self.log_path = folder / f"{self.mode}.log"
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), f"--{self.mode}", str(path)],
                cwd=REPO,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
            )
        started = time.perf_counter()
        ready = self._answer()
        self.import_s = float(ready["import_s"])
        self.start_s = time.perf_counter() - started
        self.warmup = ready["warmup"]

    def _answer(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            self.process.wait(timeout=30)
            raise SystemExit(
                f"the {self.mode} process exited with {self.process.returncode}:\n"
                f"{tail(self.log_path)}"
            )
        return dict(json.loads(line))

    def run(self, stack: Stack) -> dict[str, Any]:
        assert self.process.stdin is not None
        before, services0 = stack_cpu(stack), services_cpu(self.database)
        with CpuTrace(stack) as trace:  # the same company as the platform's runs have
            started, since = time.perf_counter(), time.time()
            self.process.stdin.write("run\n")
            self.process.stdin.flush()
            raw = self._answer()
            wall, until = time.perf_counter() - started, time.time()
        bench_s = trace.between(since, until, "bench")
        after, services1 = stack_cpu(stack), services_cpu(self.database)
        ends, cum, cpus = raw["step_ends_s"], raw["cumulative_tokens"], raw["step_cpu_s"]
        train_s = ends[-1] - ends[0]
        train_cpu_s = cpus[-1] - cpus[0]
        busy_s = raw["step_machine_busy_s"][-1] - raw["step_machine_busy_s"][0]
        stack_s = sum(after[k] - before[k] for k in after) + bench_s
        result = {
            "tokens_per_s": (cum[-1] - cum[0]) / train_s if train_s > 0 else 0.0,
            "tokens_per_s_incl_step1": cum[-1] / ends[-1],
            "train_s": train_s,
            "loop_s": ends[-1],
            "step1_s": ends[0],
            "train_cpu_s": train_cpu_s,
            "tokens_per_cpu_s": (cum[-1] - cum[0]) / train_cpu_s if train_cpu_s > 0 else 0.0,
            "cores_used": train_cpu_s / train_s if train_s > 0 else 0.0,
            # Cores others kept busy meanwhile (less the idle stack's and this process's
            # share of the whole run).
            "others_busy_cores": max(0.0, busy_s - train_cpu_s - stack_s * train_s / wall) / train_s
            if train_s > 0
            else 0.0,
            "trained_tokens": cum[-1],
            "steps": len(ends),
            "first_loss": raw["losses"][0],
            "last_loss": raw["losses"][-1],
            "run_wall_s": wall,
            "load_s": raw["load_s"],
            "tokenize_s": raw["tokenize_s"],
            "stack_cpu_s": {k: after[k] - before[k] for k in after},
            "services_cores": {k: (services1[k] - services0[k]) / wall for k in services1},
            "threads": raw["threads"],
            "device": raw["device"],
            "max_len": raw["max_len"],
            "total_steps": raw["total_steps"],
            "trainable_parameters": raw["trainable_parameters"],
            "learned_tokens_per_epoch": raw["learned_tokens_per_epoch"],
            "row_tokens": raw["row_tokens"],
            "padding_share": raw["padding_share"],
            "losses": [round(x, 5) for x in raw["losses"]],
        }
        print(
            f"  bare      {result['tokens_per_s']:8.1f} tokens/s  ({result['steps']} steps, "
            f"{train_s:.1f} s from step 1 to the last; load {result['load_s']:.2f} s + "
            f"tokenize {result['tokenize_s']:.2f} s + step 1 {result['step1_s']:.2f} s; "
            f"final loss {result['last_loss']:.4f})",
            flush=True,
        )
        return result

    def close(self) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(OSError):
                assert self.process.stdin is not None
                self.process.stdin.write("exit\n")
                self.process.stdin.close()
            try:
                self.process.wait(timeout=5)  # it reads its stdin between runs only
            except subprocess.TimeoutExpired:
                self.process.kill()  # our own child, by its pid
                self.process.wait(timeout=10)


class TrlLoop(BareLoop):
    """TRL's process (`train.py --trl CONFIG`), asked for one run per round."""

    mode = "trl"

    def run(self, stack: Stack) -> dict[str, Any]:
        assert self.process.stdin is not None
        started = time.perf_counter()
        self.process.stdin.write("run\n")
        self.process.stdin.flush()
        raw = self._answer()
        wall = time.perf_counter() - started
        ends, cum = raw["step_ends_s"], raw["cumulative_tokens"]
        train_s = ends[-1] - ends[0]
        train_cpu_s = raw["step_cpu_s"][-1] - raw["step_cpu_s"][0]
        result = {
            "tokens_per_s": (cum[-1] - cum[0]) / train_s if train_s > 0 else 0.0,
            "tokens_per_cpu_s": (cum[-1] - cum[0]) / train_cpu_s if train_cpu_s > 0 else 0.0,
            "cores_used": train_cpu_s / train_s if train_s > 0 else 0.0,
            "tokens_per_s_incl_step1": cum[-1] / ends[-1],
            "train_s": train_s,
            "step1_s": ends[0],
            "trained_tokens": cum[-1],
            "steps": len(ends),
            "valid_loss": raw["valid_loss"],
            "trl_eval_loss": raw["trl_eval_loss"],
            "padding_share": raw["padding_share"],
            "last_logged_loss": raw["losses"][-1] if raw["losses"] else None,
            "run_wall_s": wall,
            "load_s": raw["load_s"],
            "tokenize_s": raw["tokenize_s"],
            "train_call_s": raw["train_call_s"],
            "threads": raw["threads"],
            "device": raw["device"],
            "max_len": raw["max_len"],
            "trainable_parameters": raw["trainable_parameters"],
            "trl_version": raw["trl_version"],
        }
        print(
            f"  trl       {result['tokens_per_s']:8.1f} tokens/s  ({result['steps']} steps, "
            f"{train_s:.1f} s from step 1 to the last; padding {result['padding_share']:.1%}; "
            f"validation loss {result['valid_loss']:.4f})",
            flush=True,
        )
        return result


# ---------------------------------------------------------------- the platform


def services_cpu(database: str) -> dict[str, float]:
    """CPU seconds so far of the PostgreSQL backends serving `database` and of the Redis
    server (which other users of the machine may share): one scan of /proc."""
    found = {"postgres": 0.0, "redis": 0.0}
    title = f" {database} ".encode()  # backends are titled "postgres: USER DB HOST …"
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError):
            comm = Path(f"/proc/{entry}/comm").read_text().strip()
            if comm == "postgres" and title in Path(f"/proc/{entry}/cmdline").read_bytes():
                found["postgres"] += cpu_seconds(int(entry))
            elif comm == "redis-server":
                found["redis"] += cpu_seconds(int(entry))
    return found


def stack_cpu(stack: Stack) -> dict[str, float]:
    assert stack.gpu is not None
    return {
        "web": tree_cpu(stack.web.pid),
        "control_worker": tree_cpu(stack.worker.pid),
        "gpu_worker": tree_cpu(stack.gpu.pid),
    }


class CpuTrace:
    """Every 250 ms, in a thread: the unix time, the CPU seconds of the GPU worker's
    pool process (the one that trains) and of its main process, of the rest of the stack
    (web, control worker), of this process, and the machine's busy CPU seconds; read back
    at any instant by interpolation (the worker reports its steps on the same clock).
    It runs during the bare runs too, so that both sides share the machine with it."""

    COLUMNS = ("gpu_pool", "gpu_main", "web_and_control", "bench", "machine_busy")

    def __init__(self, stack: Stack, interval: float = 0.25) -> None:
        self.stack = stack
        self.interval = interval
        self.rows: list[tuple[float, ...]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cpu-trace", daemon=True)

    def _sample(self) -> None:
        assert self.stack.gpu is not None
        cpu = stack_cpu(self.stack)
        main = cpu_seconds(self.stack.gpu.pid)
        self.rows.append(
            (
                time.time(),
                cpu["gpu_worker"] - main,
                main,
                cpu["web"] + cpu["control_worker"],
                time.process_time(),
                machine_busy_seconds(),
            )
        )

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> CpuTrace:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def at(self, when: float, column: str) -> float:
        index = self.COLUMNS.index(column) + 1
        rows = self.rows
        for before, after in itertools.pairwise(rows):
            if before[0] <= when <= after[0]:
                span = after[0] - before[0]
                share = (when - before[0]) / span if span > 0 else 0.0
                return before[index] + share * (after[index] - before[index])
        return rows[0][index] if when < rows[0][0] else rows[-1][index]

    def between(self, since: float, until: float, column: str) -> float:
        return self.at(until, column) - self.at(since, column)


def api(client: httpx.Client, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
    response = client.request(method, path, **kwargs)
    if response.status_code not in (200, 201):
        raise SystemExit(f"{method} {path} answered {response.status_code}: {response.text[:800]}")
    return dict(response.json())


def upload_file(client: httpx.Client, path: Path) -> str:
    """`POST /v1/files` (purpose fine-tune), then until validation has processed it."""
    with path.open("rb") as f:
        file = api(
            client,
            "POST",
            "/v1/files",
            files={"file": (path.name, f, "application/jsonl")},
            data={"purpose": "fine-tune"},
        )
    deadline = time.monotonic() + 300
    while file["status"] not in ("processed", "error"):
        if time.monotonic() > deadline:
            raise SystemExit(f"validation of {path.name} did not finish in 5 minutes")
        time.sleep(0.1)
        file = api(client, "GET", f"/v1/files/{file['id']}")
    if file["status"] != "processed":
        raise SystemExit(f"{path.name} failed validation: {file.get('status_details')}")
    return str(file["id"])


def job_body(
    args: argparse.Namespace, file_id: str, n_epochs: int, validation_file: str | None = None
) -> dict[str, Any]:
    adapter: dict[str, Any] = {"type": "full"}
    if args.adapter == "lora":
        adapter = {
            "type": "lora",
            "r": args.lora_r,
            "alpha": args.lora_alpha,
            "dropout": 0.0,
            "target_modules": LORA_TARGETS,
        }
    return {
        "model": MODEL_NAME,
        "training_file": file_id,
        "seed": args.seed,
        "suffix": "bench",
        "method": {
            "type": "supervised",
            "supervised": {
                "hyperparameters": {
                    "n_epochs": n_epochs,
                    "batch_size": args.batch_size,
                    "learning_rate_multiplier": args.lr_multiplier,
                }
            },
        },
        "adapter": adapter,
        **({"validation_file": validation_file} if validation_file else {}),
    }


def all_events(client: httpx.Client, job_id: str) -> list[dict[str, Any]]:
    """Every event of the job, oldest first (the API pages newest first)."""
    events: list[dict[str, Any]] = []
    after = None
    while True:
        params: dict[str, Any] = {"limit": 100}
        if after:
            params["after"] = after
        page = api(client, "GET", f"/v1/fine_tuning/jobs/{job_id}/events", params=params)
        events += page["data"]
        if not page.get("has_more") or not page["data"]:
            return events[::-1]
        after = page["data"][-1]["id"]


def job_times(
    args: argparse.Namespace, job_id: str
) -> tuple[dict[str, float | None], dict[str, float]]:
    """The job's timestamps to the microsecond, and when each of its events was stored
    (the API rounds both to seconds, and has no `first_step_at`): read from the bench's
    own database."""
    with psycopg.connect(f"{args.postgres}/{args.database}", connect_timeout=5) as conn:
        row = conn.execute(
            "SELECT created_at, queued_at, started_at, first_step_at, finished_at "
            "FROM jobs_job WHERE id = %s",
            (job_id,),
        ).fetchone()
        events = conn.execute(
            "SELECT id, created_at FROM jobs_jobevent WHERE job_id = %s", (job_id,)
        ).fetchall()
    assert row is not None
    names = ("created", "queued", "started_applied", "first_step", "finished")
    out = {
        name: (value.timestamp() if value else None) for name, value in zip(names, row, strict=True)
    }
    return out, {event_id: created.timestamp() for event_id, created in events}


CELERY_LINE = re.compile(
    r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}): \w+/[\w-]+\] "
    r"Task gpuworkers\.training\.run\[[0-9a-f-]+\] (received|succeeded in ([0-9.]+)s)"
)


def gpu_task_lines(log_path: Path) -> list[tuple[str, float, float | None]]:
    """(event, unix time, run seconds) of each training task in the GPU worker's log
    (Celery logs in local time, to the millisecond)."""
    found = []
    with contextlib.suppress(OSError):
        for line in log_path.read_text(errors="replace").splitlines():
            match = CELERY_LINE.match(line)
            if match:
                at = datetime.strptime(match[1], "%Y-%m-%d %H:%M:%S,%f").timestamp()
                kind = "received" if match[2] == "received" else "succeeded"
                found.append((kind, at, float(match[3]) if match[3] else None))
    return found


class LogTail:
    """The lines a log gains from now on (read at each poll)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = path.stat().st_size if path.exists() else 0

    def new_lines(self) -> list[str]:
        with contextlib.suppress(OSError), self.path.open("rb") as f:
            f.seek(self.offset)
            data = f.read()
            end = data.rfind(b"\n") + 1  # whole lines only
            self.offset += end
            return data[:end].decode(errors="replace").splitlines()
        return []


#: How long a job may stay unfinished after its GPU task has returned.
FINAL_REPORT_GRACE_S = 30.0


def run_platform_job(
    args: argparse.Namespace,
    stack: Stack,
    client: httpx.Client,
    file_id: str,
    n_epochs: int,
    label: str,
    validation_file: str | None = None,
) -> dict[str, Any]:
    """Submit one job, follow it to the end, and measure it from its own reports."""
    assert stack.gpu is not None
    log_path = stack.log_dir / "gpu.log"
    tasks_before = len([t for t in gpu_task_lines(log_path) if t[0] == "received"])
    steal0, services0 = steal_seconds(), services_cpu(args.database)
    with CpuTrace(stack) as trace:
        sent = time.time()
        job = api(
            client,
            "POST",
            "/v1/fine_tuning/jobs",
            json=job_body(args, file_id, n_epochs, validation_file),
        )
        posted = time.time()
        job_id = job["id"]
        polls = 0
        deadline = time.monotonic() + 3600
        control_log, gpu_log = LogTail(stack.log_dir / "worker.log"), LogTail(log_path)
        task_done: float | None = None
        while job["status"] not in TERMINAL:
            if time.monotonic() > deadline:
                raise SystemExit(f"job {job_id} did not finish within an hour")
            # A report the control plane cannot apply, or a final report that never comes,
            # would otherwise leave the job `running` until its lease runs out (no beat here).
            for line in control_log.new_lines():
                if "raised unexpected" in line:
                    raise SystemExit(f"the control worker failed a task of job {job_id}:\n{line}")
            if task_done is None and any(
                "Task gpuworkers.training.run[" in line and " received" not in line
                for line in gpu_log.new_lines()
            ):
                task_done = time.monotonic()
            if task_done is not None and time.monotonic() - task_done > FINAL_REPORT_GRACE_S:
                raise SystemExit(
                    f"the GPU worker's task for job {job_id} ended {FINAL_REPORT_GRACE_S:.0f} s "
                    f"ago and the job is still {job['status']}:\n"
                    f"{tail(stack.log_dir / 'worker.log', 10)}"
                )
            for process, name in ((stack.web, "web"), (stack.worker, "worker"), (stack.gpu, "gpu")):
                if process.poll() is not None:
                    raise SystemExit(f"{name} exited:\n{tail(stack.log_dir / f'{name}.log')}")
            time.sleep(args.poll)
            job = api(client, "GET", f"/v1/fine_tuning/jobs/{job_id}")
            polls += 1
        seen_done = time.time()
    steal1, services1 = steal_seconds(), services_cpu(args.database)
    if job["status"] != "succeeded":
        raise SystemExit(f"{label} job {job_id} ended {job['status']}: {job.get('error')}")
    events = all_events(client, job_id)
    times, stored_at = job_times(args, job_id)
    progress = sorted(
        (e for e in events if e["type"] == "metrics" and "tokens_per_second" in (e["data"] or {})),
        key=lambda e: e["data"]["step"],
    )
    done = next(e for e in events if e["message"] == "The job has successfully completed")
    first, last = progress[0]["data"], progress[-1]["data"]
    if first["step"] != 1 or last["step"] != last["total_steps"]:
        raise SystemExit(
            f"{label} job {job_id}: progress reports from step {first['step']} to {last['step']}"
        )

    def elapsed(report: dict[str, Any]) -> float:
        # The engine reports tokens_per_second = tokens since start() / seconds since start().
        return float(report["trained_tokens"]) / float(report["tokens_per_second"])

    assert times["first_step"] is not None
    assert times["finished"] is not None
    t_started = times["first_step"] - elapsed(first)  # worker clock: Trainer.started()
    t_first = times["first_step"]  # worker clock: the end of step 1
    t_last = t_started + elapsed(last)  # worker clock: the end of the last step
    train_s = t_last - t_first
    tokens = int(last["trained_tokens"]) - int(first["trained_tokens"])
    # A report's trip: sent by the worker -> stored by the control worker (same clock).
    trips = sorted(stored_at[e["id"]] - (t_started + elapsed(e["data"])) for e in progress)
    trip = statistics.median(trips)
    to_succeeded = stored_at[done["id"]] - t_last
    gpu_cpu = trace.between(t_first, t_last, "gpu_pool")
    gpu_main_cpu = trace.between(t_first, t_last, "gpu_main")
    rest_cpu = trace.between(t_first, t_last, "web_and_control")
    bench_cpu = trace.between(t_first, t_last, "bench")
    busy = trace.between(t_first, t_last, "machine_busy")
    tasks = [t for t in gpu_task_lines(log_path) if t[0] == "received"]
    received = tasks[tasks_before][1] if len(tasks) > tasks_before else None
    wall = times["finished"] - posted
    result = {
        "job_id": job_id,
        "tokens_per_s": tokens / train_s if train_s > 0 else 0.0,
        "tokens_per_s_incl_step1": float(last["trained_tokens"]) / elapsed(last),
        "train_s": train_s,
        "loop_s": elapsed(last),
        "step1_s": elapsed(first),
        "train_cpu_s": gpu_cpu,
        "tokens_per_cpu_s": tokens / gpu_cpu if gpu_cpu > 0 else 0.0,
        "cores_used": gpu_cpu / train_s if train_s > 0 else 0.0,
        "web_and_control_cpu_s": rest_cpu,
        "gpu_worker_main_cores": gpu_main_cpu / train_s if train_s > 0 else 0.0,
        "others_busy_cores": max(0.0, busy - gpu_cpu - gpu_main_cpu - rest_cpu - bench_cpu)
        / train_s
        if train_s > 0
        else 0.0,
        "trained_tokens": int(job["trained_tokens"]),
        "reported_tokens": int(last["trained_tokens"]),
        "steps": int(last["step"]),
        "progress_reports": len(progress),
        "first_loss": float(first["train_loss"]),
        "last_loss": float(last["train_loss"]),
        "post_s": posted - sent,
        "submit_to_first_step_s": t_first - posted,
        "submit_to_training_start_s": t_started - posted,
        "breakdown_s": {
            "prepare (control worker: token count, price, queue)": (times["queued"] or posted)
            - posted,
            "dispatch -> GPU worker receives the task": (received - times["queued"])
            if received and times["queued"]
            else None,
            "load on the worker (model, data, tokenize)": (t_started - received)
            if received
            else None,
            "step 1": elapsed(first),
        },
        "report_trip_s": {"median": trip, "min": trips[0], "max": trips[-1]},
        # The engine does not report it: the end of the last step (worker clock) to the
        # succeeded report stored, less a report's median trip, is the artifact's writing
        # and upload (plus the succeeded report's extra work in the control plane).
        "artifact_s": done["data"].get("artifact_seconds") or to_succeeded - trip,
        "artifact_reported_by_engine": "artifact_seconds" in done["data"],
        "last_step_to_succeeded_s": to_succeeded,
        "job_wall_s": wall,
        "seen_done_s": seen_done - posted,
        "polls": polls,
        "job_cpu_s": {
            column: trace.between(sent, seen_done, column) for column in CpuTrace.COLUMNS
        },
        "steal_s": steal1 - steal0,
        # The whole job: the PostgreSQL backends of the bench database, and Redis.
        "services_cores": {
            k: (services1[k] - services0[k]) / max(seen_done - sent, 1e-9) for k in services1
        },
        "learning_rate": job.get("learning_rate"),
        "total_steps": int(last["total_steps"]),
        "artifact_files": done["data"].get("artifact_files"),
        "fine_tuned_model": job.get("fine_tuned_model"),
        "checkpoints": sum(1 for e in events if e["message"].startswith("Checkpoint created")),
        # The last evaluation on the validation rows (after the last step), when there are any.
        "valid_loss": next(
            (
                float(e["data"]["valid_loss"])
                for e in reversed(events)
                if e["type"] == "metrics" and "valid_loss" in (e["data"] or {})
            ),
            None,
        ),
    }
    if label != "warm-up":
        print(
            f"  platform  {result['tokens_per_s']:8.1f} tokens/s  ({result['steps']} steps, "
            f"{train_s:.1f} s from step 1 to the last; submit -> first step "
            f"{result['submit_to_first_step_s']:.2f} s; job {wall:.1f} s; final loss "
            f"{result['last_loss']:.4f})",
            flush=True,
        )
    return result


# ---------------------------------------------------------------- report


def best(runs: list[dict[str, Any]], key: str, *, low: bool = False) -> float:
    values = [float(r[key]) for r in runs if r.get(key) is not None]
    return (min(values) if low else max(values)) if values else float("nan")


def summarize(bare: list[dict[str, Any]], platform: list[dict[str, Any]]) -> dict[str, Any]:
    bare_best = best(bare, "tokens_per_s")
    platform_best = best(platform, "tokens_per_s")
    ratio = platform_best / bare_best if bare_best else 0.0
    by_round = [
        round(p["tokens_per_s"] / b["tokens_per_s"], 3) for b, p in zip(bare, platform, strict=True)
    ]
    first_step = [p["submit_to_first_step_s"] for p in platform]
    return {
        "bare_tokens_per_s": round(bare_best, 1),
        "platform_tokens_per_s": round(platform_best, 1),
        "ratio": round(ratio, 3),
        "ratio_by_round": by_round,
        "ratio_incl_step1": round(
            best(platform, "tokens_per_s_incl_step1") / best(bare, "tokens_per_s_incl_step1"), 3
        ),
        "bare_tokens_per_cpu_s": round(best(bare, "tokens_per_cpu_s"), 1),
        "platform_tokens_per_cpu_s": round(best(platform, "tokens_per_cpu_s"), 1),
        "ratio_per_cpu_s": round(
            best(platform, "tokens_per_cpu_s") / best(bare, "tokens_per_cpu_s"), 3
        ),
        "submit_to_first_step_s": round(min(first_step), 3),
        "submit_to_first_step_s_by_round": [round(x, 3) for x in first_step],
        "submit_to_training_start_s": round(
            best(platform, "submit_to_training_start_s", low=True), 3
        ),
        "artifact_s": round(best(platform, "artifact_s", low=True), 3),
        "artifact_reported_by_engine": all(p["artifact_reported_by_engine"] for p in platform),
        "last_step_to_succeeded_s": round(best(platform, "last_step_to_succeeded_s", low=True), 3),
        "report_trip_s": round(
            statistics.median(p["report_trip_s"]["median"] for p in platform), 4
        ),
        "job_wall_s": round(best(platform, "job_wall_s", low=True), 2),
        "platform_cores_used": [round(p["cores_used"], 3) for p in platform],
        "platform_services_cores": {
            k: round(statistics.median(p["services_cores"][k] for p in platform), 3)
            for k in ("postgres", "redis")
        },
        "platform_gpu_worker_main_cores": round(
            statistics.median(p["gpu_worker_main_cores"] for p in platform), 4
        ),
        "platform_web_and_control_cores": round(
            statistics.median(p["web_and_control_cpu_s"] / p["train_s"] for p in platform), 3
        ),
        "bare_run_wall_s": round(best(bare, "run_wall_s", low=True), 2),
        "same_tokens": all(p["trained_tokens"] == bare[0]["trained_tokens"] for p in platform),
        "loss_difference": max(abs(p["last_loss"] - bare[0]["last_loss"]) for p in platform),
    }


def print_table(results: dict[str, Any]) -> None:
    s = results["summary"]
    bare, platform = results["bare"], results["platform"]
    header = (
        "run",
        "tokens/s",
        "incl. step 1",
        "tokens/CPU s",
        "train s",
        "step 1 s",
        "tokens",
        "final loss",
        "wall s",
    )
    rows = []
    for name, runs, wall in (
        ("bare PyTorch loop (one process)", bare, s["bare_run_wall_s"]),
        ("platform (API -> Celery -> GPU worker)", platform, s["job_wall_s"]),
    ):
        rows.append(
            (
                name,
                f"{best(runs, 'tokens_per_s'):.1f}",
                f"{best(runs, 'tokens_per_s_incl_step1'):.1f}",
                f"{best(runs, 'tokens_per_cpu_s'):.1f}",
                f"{best(runs, 'train_s', low=True):.1f}",
                f"{best(runs, 'step1_s', low=True):.2f}",
                f"{runs[0]['trained_tokens']:,}",
                f"{runs[0]['last_loss']:.4f}",
                f"{wall:.1f}",
            )
        )
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(header)]
    line = "  ".join(f"{{:{'<' if i == 0 else '>'}{w}}}" for i, w in enumerate(widths))
    print()
    print(line.format(*header))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print(line.format(*row))
    print()
    m, st, d = results["model"], results["settings"], results["data"]
    print(
        f"model: Llama, hidden {m['hidden_size']}, {m['layers']} layers, context "
        f"{m['context_length']}, {m['parameters'] / 1e6:.1f}M parameters; "
        f"{st['adapter_description']}; {results['data']['rows']} chat rows (mean "
        f"{d['row_tokens']['mean']:.0f} tokens, {d['row_tokens']['over_max_len']} cut at "
        f"{st['max_seq_len']}) x "
        f"{st['n_epochs']} epoch(s), batch {st['batch_size']} = {bare[0]['steps']} steps, "
        f"lr {st['learning_rate']:g}; {st['threads']} CPU thread(s) on both sides"
    )
    print(
        "tokens/s: end of step 1 to the end of the last step (best round); wall s: bare = load, "
        "tokenize, train; platform = POST returned -> succeeded stored"
    )
    fastest = min(platform, key=lambda p: p["submit_to_first_step_s"])
    parts = " + ".join(
        f"{name.split(' (')[0]} {value:.2f}"
        for name, value in fastest["breakdown_s"].items()
        if value is not None
    )
    print(f"submit -> first step: {fastest['submit_to_first_step_s']:.2f} s = {parts}")
    print(
        f"  the first job of a freshly started GPU worker: "
        f"{results['warmup']['submit_to_first_step_s']:.2f} s (its pool process is still "
        "importing torch, transformers and peft in the background)"
    )
    bare_fast = min(bare, key=lambda b: b["load_s"] + b["tokenize_s"])
    print(
        f"  the bare process for comparison: load {bare_fast['load_s']:.2f} s + tokenize "
        f"{bare_fast['tokenize_s']:.2f} s + step 1 {bare_fast['step1_s']:.2f} s (after "
        f"{results['bare_process']['import_s']:.1f} s of imports and a warm-up run, as a "
        "running worker has)"
    )
    how = (
        "reported by the engine"
        if s["artifact_reported_by_engine"]
        else f"last step -> succeeded stored {s['last_step_to_succeeded_s']:.3f} s less a "
        f"report's median trip {s['report_trip_s'] * 1000:.0f} ms"
    )
    print(f"artifact (write + upload): {s['artifact_s']:.3f} s ({how})")
    noise = ", ".join(
        f"{r['others_busy_cores']:.2f}" for pair in zip(bare, platform, strict=True) for r in pair
    )
    print(f"cores busy with other processes while training (bare, platform, ...): {noise}")
    services = s["platform_services_cores"]
    got = ", ".join(f"{c:.2f}" for c in s["platform_cores_used"])
    side = s["platform_web_and_control_cores"]
    print(
        f"  the platform's side work while training: the GPU worker's main process "
        f"{s['platform_gpu_worker_main_cores']:.3f} cores, web + control worker {side:.3f}; "
        f"PostgreSQL (bench database) {services['postgres']:.3f} and "
        f"Redis {services['redis']:.3f} over the job (counted above); the training process "
        f"got {got} cores"
    )
    print(
        f"same work: {bare[0]['trained_tokens']:,} tokens on both sides: "
        f"{'yes' if s['same_tokens'] else 'NO'}; final losses differ by {s['loss_difference']:.1e}"
    )
    print(
        f"platform/bare tokens per CPU second: {s['ratio_per_cpu_s']:.3f} (the GPU worker's "
        f"training process against the bare one; less sensitive to other load)"
    )
    print()
    for t in results["targets"]:
        print(
            f"{t['name']}: {t['value']}   target {t['target']}: {'MET' if t['met'] else 'NOT MET'}"
        )


def targets(summary: dict[str, Any]) -> list[dict[str, Any]]:
    rounds = ", ".join(f"{r:.3f}" for r in summary["ratio_by_round"])
    firsts = ", ".join(f"{r:.2f}" for r in summary["submit_to_first_step_s_by_round"])
    return [
        {
            "name": "platform/bare tokens/s",
            "value": f"{summary['ratio']:.3f} (rounds: {rounds})",
            "target": f">= {TARGET_RATIO}",
            "met": summary["ratio"] >= TARGET_RATIO,
        },
        {
            "name": "submit -> first step s",
            "value": f"{summary['submit_to_first_step_s']:.2f} (rounds: {firsts})",
            "target": f"<= {TARGET_FIRST_STEP_S:g}",
            "met": summary["submit_to_first_step_s"] <= TARGET_FIRST_STEP_S,
        },
    ]


# ---------------------------------------------------------------- main


@dataclass
class Prepared:
    model_dir: Path
    model: dict[str, Any]
    train_path: Path
    warmup_path: Path
    rows: int
    bytes: int
    valid_path: Path | None = None


def prepare(args: argparse.Namespace, folder: Path) -> Prepared:
    print(
        f"building the model (Llama, hidden {args.hidden}, {args.layers} layers, context "
        f"{args.context}) with gpuworkers.models.tiny",
        flush=True,
    )
    model_dir = folder / "model"
    model = build_model(args, model_dir)
    rows = chat_rows(args.rows)
    train_path = write_rows(folder / "data" / "train.jsonl", rows)
    warmup_path = write_rows(folder / "data" / "warmup.jsonl", rows[: args.warmup_rows])
    valid_path = None
    if args.peer:
        valid_path = write_rows(folder / "data" / "valid.jsonl", chat_rows(args.valid_rows, seed=8))
    return Prepared(
        model_dir,
        model,
        train_path,
        warmup_path,
        len(rows),
        train_path.stat().st_size,
        valid_path,
    )


def threads(args: argparse.Namespace) -> int:
    """Training threads on CPU; 0 means what the engine takes by default, every core."""
    return args.threads or len(os.sched_getaffinity(0))


def bare_config(args: argparse.Namespace, prep: Prepared, learning_rate: float) -> dict[str, Any]:
    return {
        "model_dir": str(prep.model_dir),
        "data_path": str(prep.train_path),
        "warmup_path": str(prep.warmup_path),
        "n_epochs": args.epochs,
        "batch_size": args.batch_size,
        "learning_rate": learning_rate,
        "seed": args.seed,
        "max_seq_len": min(args.context, PLATFORM_MAX_SEQ_LEN),
        "adapter": {
            "type": args.adapter,
            "r": args.lora_r,
            "alpha": args.lora_alpha,
            "target_modules": LORA_TARGETS,
        },
        "threads": threads(args),
    }


def warm_up(
    args: argparse.Namespace, stack: Stack, client: httpx.Client, warmup_file: str
) -> tuple[dict[str, Any], float]:
    """The workers' first job (imports, model code, kernels), and the learning rate it
    trained at, which must be the one the bench gives the other side."""
    print("warm-up job (the workers' first job: imports, model code, kernels)", flush=True)
    warmup = run_platform_job(args, stack, client, warmup_file, 1, "warm-up")
    lr = BASE_LEARNING_RATE[args.adapter] * args.lr_multiplier
    if not math.isclose(float(warmup["learning_rate"]), lr, rel_tol=1e-9):
        raise SystemExit(
            f"the platform trains at learning rate {warmup['learning_rate']}, the bench "
            f"assumed {lr}: update BASE_LEARNING_RATE"
        )
    return warmup, lr


def measure(args: argparse.Namespace, prep: Prepared, folder: Path, stack: Stack) -> dict[str, Any]:
    """The warm-ups, then the rounds: bare and platform, alternating which goes first."""
    key = sign_up(stack.port)
    bare_runs: list[dict[str, Any]] = []
    platform_runs: list[dict[str, Any]] = []
    with httpx.Client(
        base_url=f"http://{HOST}:{stack.port}",
        headers={"Authorization": f"Bearer {key}"},
        timeout=60,
    ) as client:
        train_file = upload_file(client, prep.train_path)
        warmup_file = upload_file(client, prep.warmup_path)
        warmup, lr = warm_up(args, stack, client, warmup_file)
        config = bare_config(args, prep, lr)
        print("bare loop process: imports and a warm-up run", flush=True)
        bare = BareLoop(config, folder, args.database)
        try:
            for number in range(1, args.rounds + 1):
                print(f"round {number}:", flush=True)
                order = ("bare", "platform") if number % 2 else ("platform", "bare")
                for side in order:
                    if side == "bare":
                        bare_runs.append(bare.run(stack))
                    else:
                        platform_runs.append(
                            run_platform_job(
                                args, stack, client, train_file, args.epochs, "measured"
                            )
                        )
        finally:
            bare.close()
    return {
        "config": config,
        "warmup": warmup,
        "bare_process": {
            "import_s": round(bare.import_s, 2),
            "start_s": round(bare.start_s, 2),
            "warmup_load_s": round(bare.warmup["load_s"], 3),
        },
        "bare": bare_runs,
        "platform": platform_runs,
    }


def measure_peer(
    args: argparse.Namespace, prep: Prepared, folder: Path, stack: Stack
) -> dict[str, Any]:
    """A warm-up job, then the rounds: TRL and the platform, alternating which goes first,
    both with the validation rows."""
    assert prep.valid_path is not None
    key = sign_up(stack.port)
    peer_runs: list[dict[str, Any]] = []
    platform_runs: list[dict[str, Any]] = []
    with httpx.Client(
        base_url=f"http://{HOST}:{stack.port}",
        headers={"Authorization": f"Bearer {key}"},
        timeout=60,
    ) as client:
        train_file = upload_file(client, prep.train_path)
        valid_file = upload_file(client, prep.valid_path)
        warmup_file = upload_file(client, prep.warmup_path)
        warmup, lr = warm_up(args, stack, client, warmup_file)
        config = {
            **bare_config(args, prep, lr),
            "valid_path": str(prep.valid_path),
            "work_dir": str(folder),
            "eval_each_epoch": True,
            "trl_logging_steps": args.trl_logging_steps,
        }
        print("TRL process: imports and a warm-up run", flush=True)
        peer = TrlLoop(config, folder, args.database)
        try:
            for number in range(1, args.rounds + 1):
                print(f"round {number}:", flush=True)
                order = ("trl", "platform") if number % 2 else ("platform", "trl")
                for side in order:
                    if side == "trl":
                        peer_runs.append(peer.run(stack))
                    else:
                        platform_runs.append(
                            run_platform_job(
                                args, stack, client, train_file, args.epochs, "measured", valid_file
                            )
                        )
        finally:
            peer.close()
    return {
        "config": config,
        "warmup": warmup,
        "peer_process": {"import_s": round(peer.import_s, 2), "start_s": round(peer.start_s, 2)},
        "trl": peer_runs,
        "platform": platform_runs,
    }


TARGET_PEER_RATIO = 1.2  # platform tokens/s >= 1.2 x TRL's, at equal or better validation loss
#: "Equal" validation loss: within this much (relative) of the peer's.
VALID_LOSS_TOLERANCE = 0.005


def summarize_peer(trl: list[dict[str, Any]], platform: list[dict[str, Any]]) -> dict[str, Any]:
    trl_best, platform_best = best(trl, "tokens_per_s"), best(platform, "tokens_per_s")
    trl_loss = statistics.median(r["valid_loss"] for r in trl)
    platform_loss = statistics.median(r["valid_loss"] for r in platform)
    return {
        "trl_tokens_per_s": round(trl_best, 1),
        "platform_tokens_per_s": round(platform_best, 1),
        "ratio": round(platform_best / trl_best, 3) if trl_best else 0.0,
        "ratio_by_round": [
            round(p["tokens_per_s"] / t["tokens_per_s"], 3)
            for t, p in zip(trl, platform, strict=True)
        ],
        "ratio_per_cpu_s": round(
            best(platform, "tokens_per_cpu_s") / best(trl, "tokens_per_cpu_s"), 3
        ),
        "trl_tokens_per_cpu_s": round(best(trl, "tokens_per_cpu_s"), 1),
        "platform_tokens_per_cpu_s": round(best(platform, "tokens_per_cpu_s"), 1),
        "cores_used": {
            "trl": [round(r["cores_used"], 2) for r in trl],
            "platform": [round(r["cores_used"], 2) for r in platform],
        },
        "trl_tokens_per_s_by_round": [round(r["tokens_per_s"], 1) for r in trl],
        "platform_tokens_per_s_by_round": [round(r["tokens_per_s"], 1) for r in platform],
        "trl_valid_loss": round(trl_loss, 5),
        "platform_valid_loss": round(platform_loss, 5),
        "trl_eval_loss_own_average": trl[0]["trl_eval_loss"],
        "trl_padding_share": trl[0]["padding_share"],
        "same_tokens": all(p["trained_tokens"] == trl[0]["trained_tokens"] for p in platform),
        "trained_tokens": {
            "trl": trl[0]["trained_tokens"],
            "platform": platform[0]["trained_tokens"],
        },
        "steps": {"trl": trl[0]["steps"], "platform": platform[0]["steps"]},
    }


def peer_targets(s: dict[str, Any]) -> list[dict[str, Any]]:
    rounds = ", ".join(f"{r:.3f}" for r in s["ratio_by_round"])
    loss_ok = s["platform_valid_loss"] <= s["trl_valid_loss"] * (1 + VALID_LOSS_TOLERANCE)
    return [
        {
            "name": "platform/TRL tokens/s",
            "value": f"{s['ratio']:.3f} (rounds: {rounds})",
            "target": f">= {TARGET_PEER_RATIO}",
            "met": s["ratio"] >= TARGET_PEER_RATIO,
        },
        {
            "name": "platform validation loss vs TRL's",
            "value": f"{s['platform_valid_loss']:.4f} vs {s['trl_valid_loss']:.4f}",
            "target": f"<= TRL's (+{VALID_LOSS_TOLERANCE:.1%})",
            "met": loss_ok,
        },
    ]


def print_peer_table(results: dict[str, Any]) -> None:
    s, trl, platform = results["summary"], results["trl"], results["platform"]
    header = (
        "run",
        "tokens/s",
        "by round",
        "tokens/CPU s",
        "padding",
        "steps",
        "tokens",
        "valid loss",
    )
    rows = [
        (
            f"TRL {trl[0]['trl_version']} SFTTrainer (group_by_length)",
            f"{s['trl_tokens_per_s']:.1f}",
            ", ".join(f"{x:.0f}" for x in s["trl_tokens_per_s_by_round"]),
            f"{s['trl_tokens_per_cpu_s']:.1f}",
            f"{trl[0]['padding_share']:.1%}",
            str(trl[0]["steps"]),
            f"{trl[0]['trained_tokens']:,}",
            f"{s['trl_valid_loss']:.4f}",
        ),
        (
            "platform (API -> Celery -> GPU worker)",
            f"{s['platform_tokens_per_s']:.1f}",
            ", ".join(f"{x:.0f}" for x in s["platform_tokens_per_s_by_round"]),
            f"{s['platform_tokens_per_cpu_s']:.1f}",
            f"{results['data']['platform_padding_share']:.1%}",
            str(platform[0]["steps"]),
            f"{platform[0]['trained_tokens']:,}",
            f"{s['platform_valid_loss']:.4f}",
        ),
    ]
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(header)]
    line = "  ".join(f"{{:{'<' if i == 0 else '>'}{w}}}" for i, w in enumerate(widths))
    print()
    print(line.format(*header))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print(line.format(*row))
    print()
    st = results["settings"]
    print(
        f"{results['data']['rows']} chat rows x {st['n_epochs']} epoch(s), batch "
        f"{st['batch_size']}, "
        f"lr {st['learning_rate']:g}, {st['adapter_description']}, max length "
        f"{st['max_seq_len']}, {st['threads']} CPU thread(s) each; "
        f"{results['data']['valid_rows']} validation rows, evaluated at each epoch's end on "
        "both sides"
    )
    print(
        "tokens/s: non-padding tokens, end of step 1 to the end of the last step (best round); "
        "valid loss: summed over the validation rows' learned tokens / their count"
    )
    cores = s["cores_used"]
    print(
        f"platform/TRL tokens per CPU second: {s['ratio_per_cpu_s']:.3f} (each side's training "
        "process; less sensitive to the neighbours' load); cores the training processes got: "
        f"TRL {', '.join(f'{c:.2f}' for c in cores['trl'])}, platform "
        f"{', '.join(f'{c:.2f}' for c in cores['platform'])}"
    )
    print()
    for t in results["targets"]:
        print(
            f"{t['name']}: {t['value']}   target {t['target']}: {'MET' if t['met'] else 'NOT MET'}"
        )


def platform_padding_share(prep: Prepared, args: argparse.Namespace) -> float:
    """The padding of the engine's default batches of the bench's rows (computed with
    the engine's own code: the same tokens and order the GPU worker trains on)."""
    from transformers import AutoTokenizer

    from gpuworkers.training import data as engine_data

    tokenizer = AutoTokenizer.from_pretrained(prep.model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    dataset = engine_data.load(
        prep.train_path,
        fmt="chat",
        tokenizer=tokenizer,
        labels=(),
        max_len=min(args.context, PLATFORM_MAX_SEQ_LEN),
    )
    order = engine_data.BatchOrder(len(dataset), args.batch_size, args.seed, dataset.row_lengths())
    batches = [order.rows(step) for step in range(1, order.per_epoch * args.epochs + 1)]
    return round(engine_data.padding_share(dataset, batches), 4)


def main_peer(args: argparse.Namespace, info: dict[str, Any]) -> int:
    started = datetime.now(UTC)
    t0 = time.perf_counter()
    info["versions"]["trl"] = importlib.metadata.version("trl")
    print(
        f"atelier train bench vs TRL: {args.rows} rows x {args.epochs} epoch(s), batch "
        f"{args.batch_size}, {args.adapter}, {threads(args)} training thread(s), {args.rounds} "
        "round(s), alternating which side goes first",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="atelier-bench-train-", dir=args.tmpdir) as tmp:
        folder = Path(tmp)
        prep = prepare(args, folder)
        padding = platform_padding_share(prep, args)
        data_dir = folder / "server"
        with platform_database(args, data_dir, name="train") as env:
            manage(env, "import_base_model", str(prep.model_dir), "--name", MODEL_NAME)
            gpu_env = {"TORCH_NUM_THREADS": str(args.threads)} if args.threads else {}
            with started_stack(env, data_dir / "logs", gpu=True, gpu_env=gpu_env) as stack:
                try:
                    measured = measure_peer(args, prep, folder, stack)
                except (Exception, SystemExit):
                    for name in ("web", "worker", "gpu"):
                        print(f"{name} log (tail):\n{tail(stack.log_dir / f'{name}.log')}")
                    print(f"TRL log (tail):\n{tail(folder / 'trl.log')}")
                    raise
                finally:
                    if args.keep_logs is not None:
                        shutil.copytree(stack.log_dir, args.keep_logs, dirs_exist_ok=True)
    trl_runs, platform_runs, config = measured["trl"], measured["platform"], measured["config"]
    summary = summarize_peer(trl_runs, platform_runs)
    lora = f"LoRA r={args.lora_r} alpha={args.lora_alpha} on {', '.join(LORA_TARGETS)}"
    results: dict[str, Any] = {
        "benchmark": "train_peers",
        "date": started.isoformat(timespec="seconds"),
        "git": git_commit(),
        "machine": info,
        "settings": {
            "rounds": args.rounds,
            "round_order": "TRL first in odd rounds, the platform first in even ones; each "
            "side's best round counts for tokens/s, the median for validation loss",
            "n_epochs": args.epochs,
            "batch_size": args.batch_size,
            "learning_rate": config["learning_rate"],
            "max_seq_len": config["max_seq_len"],
            "seed": args.seed,
            "adapter": args.adapter,
            "adapter_description": lora if args.adapter == "lora" else "full fine-tune",
            "threads": config["threads"],
            "trl": {
                "SFTConfig": "per_device_train_batch_size=batch, learning_rate=lr, "
                "lr_scheduler_type=linear, warmup_steps=0, weight_decay=0, max_grad_norm=1, "
                "optim=adamw_torch_fused, seed=data_seed=seed, max_length, packing=False, "
                "padding_free=False, gradient_checkpointing=False, "
                "train_sampling_strategy=group_by_length, eval_strategy=epoch, "
                f"logging_steps={args.trl_logging_steps}, save_strategy=no, "
                "dataloader_num_workers=0, use_cpu on CPU",
                "model": "the same LoRA model (get_peft_model after torch.manual_seed(seed), as "
                "the engine), passed in; the dataset pre-tokenized with the engine's token ids and "
                "labels (-100 off the assistant turns)",
            },
            "platform": "POST /v1/fine_tuning/jobs with a validation_file; the engine's defaults "
            "(length-grouped batches, no packing: the API does not expose packing)",
            "tokens_per_s": "non-padding tokens per second of training, end of step 1 to the "
            "end of the last step (TRL: a callback's on_step_end; platform: progress reports)",
            "valid_loss": "after the last step: cross-entropy summed over the validation rows' "
            "learned tokens / their count (the engine's valid_loss; for TRL computed the same way "
            "on its trained model; TRL's own eval_loss, a mean of batch means, is in trl[]). "
            "Equal: within 0.5%",
        },
        "model": prep.model,
        "data": {
            "rows": prep.rows,
            "valid_rows": args.valid_rows,
            "bytes": prep.bytes,
            "platform_padding_share": padding,
            "generator": "chat_rows(seed=7) for training, chat_rows(seed=8) for validation",
        },
        "summary": summary,
        "targets": peer_targets(summary),
        "trl": trl_runs,
        "platform": platform_runs,
        "warmup": measured["warmup"],
        "peer_process": measured["peer_process"],
    }
    results["all_targets_met"] = all(t["met"] for t in results["targets"])
    results["total_seconds"] = round(time.perf_counter() - t0, 1)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print_peer_table(results)
    shown = args.output.relative_to(REPO) if args.output.is_relative_to(REPO) else args.output
    print(f"wrote {shown} ({results['total_seconds']:.0f} s)")
    if not summary["same_tokens"]:
        print("FAILED: the two sides did not train the same tokens", file=sys.stderr)
        return 1
    if args.check and not results["all_targets_met"]:
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--bare"]:
        return bare_child(argv[1])
    if argv[:1] == ["--trl"]:
        return trl_child(argv[1])
    args = parse_args(argv)
    # SIGTERM unwinds like Ctrl-C: the server, the workers, the database and the files go.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    info = machine_info()
    for dist in ("torch", "transformers", "peft", "tokenizers", "celery", "redis"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            info["versions"][dist] = importlib.metadata.version(dist)
    if args.peer:
        return main_peer(args, info)
    started = datetime.now(UTC)
    t0 = time.perf_counter()
    print(
        f"atelier train bench: {args.rows} rows x {args.epochs} epoch(s), batch "
        f"{args.batch_size}, {args.adapter}, {threads(args)} training thread(s), {args.rounds} "
        "round(s), alternating which side goes first",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="atelier-bench-train-", dir=args.tmpdir) as tmp:
        folder = Path(tmp)
        prep = prepare(args, folder)
        data_dir = folder / "server"
        with platform_database(args, data_dir, name="train") as env:
            print(
                f"importing it as base model {MODEL_NAME!r} (atelier manage import_base_model)",
                flush=True,
            )
            manage(env, "import_base_model", str(prep.model_dir), "--name", MODEL_NAME)
            gpu_env = {"TORCH_NUM_THREADS": str(args.threads)} if args.threads else {}
            with started_stack(env, data_dir / "logs", gpu=True, gpu_env=gpu_env) as stack:
                try:
                    measured = measure(args, prep, folder, stack)
                except (Exception, SystemExit):  # not Ctrl-C: the user knows why it stopped
                    for name in ("web", "worker", "gpu"):
                        print(f"{name} log (tail):\n{tail(stack.log_dir / f'{name}.log')}")
                    print(f"bare loop log (tail):\n{tail(folder / 'bare.log')}")
                    raise
                finally:
                    if args.keep_logs is not None:
                        shutil.copytree(stack.log_dir, args.keep_logs, dirs_exist_ok=True)
    bare_runs, platform_runs, config = measured["bare"], measured["platform"], measured["config"]
    summary = summarize(bare_runs, platform_runs)
    lora = f"LoRA r={args.lora_r} alpha={args.lora_alpha} on {', '.join(LORA_TARGETS)}"
    results: dict[str, Any] = {
        "benchmark": "train",
        "date": started.isoformat(timespec="seconds"),
        "git": git_commit(),
        "machine": info,
        "settings": {
            "rounds": args.rounds,
            "round_order": "bare first in odd rounds, platform first in even ones; each side's "
            "best round counts",
            "n_epochs": args.epochs,
            "batch_size": args.batch_size,
            "learning_rate_multiplier": args.lr_multiplier,
            "learning_rate": config["learning_rate"],
            "max_seq_len": config["max_seq_len"],
            "seed": args.seed,
            "adapter": args.adapter,
            "adapter_description": lora if args.adapter == "lora" else "full fine-tune",
            "threads": config["threads"],
            "poll_s": args.poll,
            "server": f"atelier web (WEB_CONCURRENCY={args.workers}) + atelier worker control + "
            "atelier worker gpu (one pool process), DEBUG=false, local files, PostgreSQL + Redis "
            "on loopback; a warm-up job first",
            "tokens_per_s": "non-padding tokens per second of training loop, end of step 1 to "
            "the end of the last step (platform: from the worker's progress reports)",
            "django_settings_module": args.settings,
            "extra_env": sorted(args.env),
        },
        "model": prep.model,
        "data": {
            "rows": prep.rows,
            "bytes": prep.bytes,
            "learned_tokens_per_epoch": bare_runs[0]["learned_tokens_per_epoch"],
            "row_tokens": bare_runs[0]["row_tokens"],
            "padding_share_of_batches": bare_runs[0]["padding_share"],
            "generator": "chat_rows(seed=7): support chat, 60% with a system prompt, 1-3 turns",
        },
        "summary": summary,
        "targets": targets(summary),
        "bare": bare_runs,
        "platform": platform_runs,
        "warmup": measured["warmup"],
        "bare_process": measured["bare_process"],
        "total_seconds": 0.0,
    }
    results["all_targets_met"] = all(t["met"] for t in results["targets"])
    results["total_seconds"] = round(time.perf_counter() - t0, 1)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print_table(results)
    shown = args.output.relative_to(REPO) if args.output.is_relative_to(REPO) else args.output
    print(f"wrote {shown} ({results['total_seconds']:.0f} s)")
    if not summary["same_tokens"]:
        print("FAILED: the two sides did not train the same tokens", file=sys.stderr)
        return 1
    if args.check and not results["all_targets_met"]:
        return 1
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted; cleaned up", file=sys.stderr)
        sys.exit(130)
