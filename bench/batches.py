"""The Batch API against the bare model, and what a running batch does to live latency.

    .venv/bin/python bench/batches.py              # N=10,000 lines; a few minutes on 2 cores
    .venv/bin/python bench/batches.py --lines 2000 # quicker

One run, one model (the tiny Llama of `gpuworkers.models.tiny`, imported as `bench-llama`
into a throw-away database), the same prompts, greedy, the same max_tokens:

- bare: the N prompts through `gpuworkers.inference.bare.generate` in this process, in
  batches of 32 (the engine's `max_batch`), before and after the platform (pooled: the
  machine is shared);
- platform: a `/v1/completions` batch of the same N prompts through the official
  `openai` SDK (files.create, batches.create, polling batches.retrieve, files.content)
  against a real `atelier web` + `atelier worker control` (the batch runner) + `atelier
  worker inference`, from create to `completed`. Ratio = platform lines/s over bare
  lines/s (target >= 0.8);
- live: `POST /v1/completions` at concurrency 1, alone (before and after, pooled) and
  while a second batch runs. Target: p50 no more than 20% worse.

Prints a table and writes bench/results/batches.json.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import signal
import statistics
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from _stack import manage, platform_database, private_servers, started_stack
from api_auth import REPO, git_commit, machine_info, sign_up, stop_server, tail
from inference import start_inference_worker

from gpuworkers.inference import bare
from gpuworkers.models import tiny

MODEL_NAME = "bench-llama"
PROMPT = "hello how can i help today your order has shipped"
TARGET_RATIO = 0.8
TARGET_LIVE_SLOWDOWN = 1.2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--lines", type=int, default=10_000, help="batch lines (10,000)")
    p.add_argument("--tokens", type=int, default=16, help="max_tokens per line (16)")
    p.add_argument("--live", type=int, default=40, help="live c=1 requests per measurement (40)")
    p.add_argument(
        "--batch-concurrency",
        type=int,
        default=None,
        help="INFERENCE_BATCH_CONCURRENCY of the worker (unset: its default, three "
        "quarters of INFERENCE_CONCURRENCY)",
    )
    p.add_argument("--threads", type=int, default=1, help="TORCH_NUM_THREADS, both sides (1)")
    p.add_argument("--hidden", type=int, default=256, help="the local Llama's hidden size (256)")
    p.add_argument("--layers", type=int, default=4, help="the local Llama's layers (4)")
    p.add_argument(
        "--postgres",
        default=os.environ.get("BENCH_POSTGRES_URL", "postgres://postgres@127.0.0.1:5432"),
    )
    p.add_argument("--database", default="atelier_bench_batches")
    p.add_argument(
        "--redis",
        default=os.environ.get("BENCH_BATCHES_REDIS_URL", "redis://127.0.0.1:6379/12"),
        help="Redis db 12 (tests use 15, inference 7)",
    )
    p.add_argument("--workers", type=int, default=2, help="WEB_CONCURRENCY (2)")
    p.add_argument("--settings", default="controlplane.settings.local")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE")
    p.add_argument("--tmpdir", type=Path, default=None)
    p.add_argument("--output", type=Path, default=REPO / "bench" / "results" / "batches.json")
    p.add_argument("--check", action="store_true", help="exit 1 unless every target is met")
    p.add_argument("--private-servers", action="store_true")
    return p.parse_args(argv)


def prompts(n: int) -> list[str]:
    return [f"{PROMPT} {i}" for i in range(n)]


def run_bare(loaded: Any, texts: list[str], tokens: int) -> dict[str, float]:
    started = time.perf_counter()
    produced = 0
    for at in range(0, len(texts), 32):
        produced += bare.generate(loaded, texts[at : at + 32], max_new_tokens=tokens).tokens
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "tokens": produced, "lines_per_s": len(texts) / seconds}


def batch_file(texts: list[str], tokens: int) -> bytes:
    return b"".join(
        json.dumps(
            {
                "custom_id": f"line-{i}",
                "method": "POST",
                "url": "/v1/completions",
                "body": {
                    "model": MODEL_NAME,
                    "prompt": text,
                    "max_tokens": tokens,
                    "temperature": 0,
                },
            }
        ).encode()
        + b"\n"
        for i, text in enumerate(texts)
    )


def start_batch(client: Any, texts: list[str], tokens: int) -> tuple[str, float]:
    file = client.files.create(
        file=("batch.jsonl", io.BytesIO(batch_file(texts, tokens))), purpose="batch"
    )
    started = time.perf_counter()
    batch = client.batches.create(
        input_file_id=file.id, endpoint="/v1/completions", completion_window="24h"
    )
    return batch.id, started


def wait_batch(client: Any, batch_id: str, timeout: float = 3600) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        batch = client.batches.retrieve(batch_id)
        if batch.status in ("completed", "failed", "expired", "cancelled"):
            return batch
        time.sleep(0.1)
    raise SystemExit(f"batch {batch_id} did not finish in {timeout:.0f}s")


def completed(client: Any, batch_id: str) -> int:
    counts = client.batches.retrieve(batch_id).request_counts
    return int(counts.completed or 0) if counts is not None else 0


def rate(marks: list[tuple[float, int]], first: int, last: int) -> float:
    return round((marks[last][1] - marks[first][1]) / (marks[last][0] - marks[first][0]), 2)


def live_c1(client: Any, n: int, tokens: int, stop: threading.Event | None = None) -> list[float]:
    """Seconds of `n` sequential completions (fewer if `stop` is set first)."""
    out = []
    for i in range(n):
        if stop is not None and stop.is_set():
            break
        started = time.perf_counter()
        client.completions.create(
            model=MODEL_NAME, prompt=f"{PROMPT} live {i}", max_tokens=tokens, temperature=0
        )
        out.append(time.perf_counter() - started)
    return out


def ms(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50_ms": None, "p90_ms": None}
    ordered = sorted(values)
    return {
        "p50_ms": round(statistics.median(ordered) * 1000, 3),
        "p90_ms": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.9))] * 1000, 3),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with private_servers(args, args.tmpdir):
        return measure(args)


def measure(args: argparse.Namespace) -> int:
    import openai
    import torch

    signal.signal(signal.SIGTERM, signal.default_int_handler)
    os.environ["TORCH_NUM_THREADS"] = str(args.threads)
    torch.set_num_threads(args.threads)
    began = datetime.now(UTC)
    t0 = time.perf_counter()
    texts = prompts(args.lines)
    with tempfile.TemporaryDirectory(prefix="atelier-bench-batches-", dir=args.tmpdir) as tmp:
        folder = Path(tmp)
        model_dir = tiny.build("llama", folder / "model", hidden=args.hidden, layers=args.layers)
        loaded = bare.load(model_dir)
        bare.generate(loaded, texts[:32], max_new_tokens=args.tokens)  # warm
        print(f"bare: {args.lines} prompts in batches of 32, {args.tokens} tokens", flush=True)
        bare_runs = [run_bare(loaded, texts, args.tokens)]
        data_dir = folder / "server"
        with platform_database(args, data_dir, name="batches") as env:
            manage(env, "import_base_model", str(model_dir), "--name", MODEL_NAME)
            with started_stack(env, data_dir / "logs") as stack:
                log = stack.log_dir / "inference.log"
                worker = start_inference_worker(
                    env,
                    log,
                    args.threads,
                    None
                    if args.batch_concurrency is None
                    else {"INFERENCE_BATCH_CONCURRENCY": str(args.batch_concurrency)},
                )
                try:
                    key = sign_up(stack.port)
                    manage(
                        env,
                        "shell",
                        "-c",
                        "from controlplane.tenancy.models import Organization; "
                        "Organization.objects.update(plan='enterprise')",
                    )
                    client = openai.OpenAI(
                        api_key=key,
                        base_url=f"http://127.0.0.1:{stack.port}/v1",
                        max_retries=0,
                        timeout=120,
                    )
                    live_c1(client, 5, args.tokens)  # loads the model
                    print(f"live c=1 alone: {args.live} requests", flush=True)
                    alone = live_c1(client, args.live, args.tokens)
                    print(f"platform: a batch of {args.lines} lines", flush=True)
                    batch_id, started = start_batch(client, texts, args.tokens)
                    done = wait_batch(client, batch_id)
                    platform_s = time.perf_counter() - started
                    output = client.files.content(done.output_file_id).text.splitlines()
                    rows = [json.loads(line) for line in output]
                    produced = sum(
                        r["response"]["body"]["usage"]["completion_tokens"] for r in rows
                    )
                    print("live c=1 while a batch runs", flush=True)
                    during_texts = texts[: max(500, args.lines // 2)]
                    during_id, _ = start_batch(client, during_texts, args.tokens)
                    # A small batch may finish before it is seen in progress.
                    while client.batches.retrieve(during_id).status == "validating":
                        time.sleep(0.1)
                    time.sleep(1.0)  # the worker's batch lane full
                    # Lines the batch answers while live traffic runs, read off its
                    # request_counts (written every 0.5 s, so rates over seconds), over
                    # the whole live run and over its second half (once the work the
                    # worker held when live traffic began is done).
                    running_at_start = client.batches.retrieve(during_id).status == "in_progress"
                    marks = [(time.perf_counter(), completed(client, during_id))]
                    during = live_c1(client, args.live // 2, args.tokens)
                    marks.append((time.perf_counter(), completed(client, during_id)))
                    during += live_c1(client, args.live - args.live // 2, args.tokens)
                    marks.append((time.perf_counter(), completed(client, during_id)))
                    after = client.batches.retrieve(during_id)
                    still_running = after.status == "in_progress"
                    if still_running:
                        try:
                            client.batches.cancel(during_id)
                        except openai.ConflictError:
                            still_running = False  # it finished in between: nothing to cancel
                    wait_batch(client, during_id)
                    alone += live_c1(client, args.live, args.tokens)
                except (Exception, SystemExit):
                    for name in ("web", "worker", "inference"):
                        print(f"{name} log (tail):\n{tail(stack.log_dir / f'{name}.log')}")
                    raise
                finally:
                    stop_server(worker)
        bare_runs.append(run_bare(loaded, texts, args.tokens))
    bare_lines_s = statistics.mean(r["lines_per_s"] for r in bare_runs)
    bare_tokens_s = statistics.mean(r["tokens"] / r["seconds"] for r in bare_runs)
    platform_lines_s = args.lines / platform_s
    ratio = platform_lines_s / bare_lines_s
    alone_ms, during_ms = ms(alone), ms(during)
    slowdown = (during_ms["p50_ms"] or 0) / (alone_ms["p50_ms"] or 1)
    report: dict[str, Any] = {
        "benchmark": "batches",
        "started_at": began.isoformat(),
        "seconds": round(time.perf_counter() - t0, 1),
        "machine": machine_info(),
        "commit": git_commit(),
        "settings": {
            "lines": args.lines,
            "max_tokens": args.tokens,
            "live_requests": args.live,
            "batch_concurrency": args.batch_concurrency,
            "threads": args.threads,
            "model": f"gpuworkers.models.tiny llama, hidden {args.hidden}, {args.layers} layers",
            "servers": args.servers,
        },
        "rows": [
            {
                "name": "bare, batches of 32 (pooled)",
                "lines_per_s": round(bare_lines_s, 2),
                "tokens_per_s": round(bare_tokens_s, 1),
                "runs_seconds": [round(r["seconds"], 2) for r in bare_runs],
            },
            {
                "name": f"platform batch ({done.status})",
                "lines_per_s": round(platform_lines_s, 2),
                "tokens_per_s": round(produced / platform_s, 1),
                "seconds": round(platform_s, 2),
                "completed": done.request_counts.completed,
                "failed": done.request_counts.failed,
                "vs_bare": round(ratio, 3),
            },
            {"name": "live c=1 alone (pooled)", "requests": len(alone), **alone_ms},
            {
                "name": "live c=1 during a batch",
                "requests": len(during),
                **during_ms,
                "batch_running_at_start": running_at_start,
                "batch_still_running_at_end": still_running,
                "batch_lines_per_s": rate(marks, 0, 2),
                "batch_lines_per_s_second_half": rate(marks, 1, 2),
                "vs_alone_p50": round(slowdown, 3),
            },
        ],
        "targets": {
            "vs_bare": {"target": f">= {TARGET_RATIO}", "met": ratio >= TARGET_RATIO},
            "live_slowdown_p50": {
                "target": f"<= {TARGET_LIVE_SLOWDOWN}",
                "met": slowdown <= TARGET_LIVE_SLOWDOWN,
            },
        },
    }
    print()
    print(f"{'row':34} {'lines/s':>9} {'tok/s':>9} {'p50 ms':>9} {'p90 ms':>9} {'ratio':>7}")
    for row in report["rows"]:
        ratio_cell = row.get("vs_bare", row.get("vs_alone_p50", ""))
        print(
            f"{row['name']:34} {row.get('lines_per_s', row.get('batch_lines_per_s', '')):>9} "
            f"{row.get('tokens_per_s', ''):>9} "
            f"{row.get('p50_ms', '') or '':>9} {row.get('p90_ms', '') or '':>9} {ratio_cell:>7}"
        )
    if not running_at_start:
        print("note: the second batch had ended before the live run began (too few --lines)")
    for name, target in report["targets"].items():
        print(f"target {name} {target['target']}: {'met' if target['met'] else 'NOT met'}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.output}")
    if args.check and not all(t["met"] for t in report["targets"].values()):
        return 1
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        raise SystemExit(main())
