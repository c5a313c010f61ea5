"""Inference through the whole platform against the bare model: what HTTP, the gateway,
Celery + Redis and the worker add.

    .venv/bin/python bench/inference.py            # ~1-1.5 min on 2 cores
    .venv/bin/python bench/inference.py --help

One run, one model (the tiny Llama of `gpuworkers.models.tiny`, imported with
`atelier manage import_base_model` as `bench-llama` into a throw-away database), the same
prompt, greedy, the same max_tokens:

- bare: `gpuworkers.inference.bare.generate` in this process, batch 1 and batch 32
  (bench/inference_worker.py's `run_bare`), and batch 1 with max_tokens=1 as the bare
  time to first token;
- platform: `POST /v1/completions` against a real `atelier web` + `atelier worker
  inference` + `atelier worker control` (Redis broker, PostgreSQL), at concurrency 1 and
  32 (httpx.AsyncClient, keep-alive), non-streaming and streaming (SSE; TTFT = the first
  content delta).

Overhead = platform latency - bare batch-1 latency (p50 and p99). The `start` replies
the worker publishes (`broker_ms`, `queue_ms`) are read off Redis pub/sub and the
`openai-processing-ms` header off each response, to show where the time goes. Prints a
table and writes bench/results/inference.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

# Shared, not copied: the stack (throw-away database, server and workers), the api_auth
# helpers (sign-up, report metadata) and the worker bench's bare baseline.
from _http import LeanClient
from _stack import (
    manage,
    platform_database,
    private_servers,
    redis_pid,
    started_stack,
    tree_cpu,
)
from api_auth import BIN, REPO, git_commit, machine_info, sign_up, stop_server, tail
from inference_worker import PROMPT, make_request, pct, run_bare

from gpuworkers.inference import bare
from gpuworkers.models import tiny

MODEL_NAME = "bench-llama"
TARGET_OVERHEAD_P50_MS = 3.0
TARGET_OVERHEAD_P99_MS = 15.0
TARGET_C32_RATIO = 0.7
TARGET_TTFT_OVERHEAD_MS = 5.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--tokens", type=int, default=32, help="max_tokens per request (32)")
    p.add_argument("--repeats", type=int, default=100, help="requests at concurrency 1 (100)")
    p.add_argument("--concurrency", type=int, default=32, help="clients for the c=32 rows")
    p.add_argument("--each", type=int, default=4, help="requests per client per c=32 round (4)")
    p.add_argument(
        "--rounds",
        type=int,
        default=6,
        help="c=32 rounds, each between two bare batches of 32; the row is their median (6)",
    )
    p.add_argument(
        "--concurrent-only",
        action="store_true",
        help="only the c=32 rows (for iterating on throughput; c=1 targets are not measured)",
    )
    p.add_argument("--threads", type=int, default=1, help="TORCH_NUM_THREADS, both sides (1)")
    p.add_argument("--hidden", type=int, default=256, help="the local Llama's hidden size (256)")
    p.add_argument("--layers", type=int, default=4, help="the local Llama's layers (4)")
    p.add_argument(
        "--postgres",
        default=os.environ.get("BENCH_POSTGRES_URL", "postgres://postgres@127.0.0.1:5432"),
    )
    p.add_argument("--database", default="atelier_bench_inference")
    p.add_argument(
        "--redis",
        default=os.environ.get("BENCH_INFERENCE_REDIS_URL", "redis://127.0.0.1:6379/7"),
        help="Redis db 7 (tests use 15, api_auth 14, ingest 13, train 9)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=2,
        help="WEB_CONCURRENCY (2, as docker-compose.yml and deploy/k8s run the web)",
    )
    p.add_argument(
        "--client",
        choices=("lean", "httpx"),
        default="lean",
        help="HTTP client: lean (bench/_http.py, default) or httpx",
    )
    p.add_argument("--settings", default="controlplane.settings.local")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE")
    p.add_argument("--tmpdir", type=Path, default=None)
    p.add_argument("--output", type=Path, default=REPO / "bench" / "results" / "inference.json")
    p.add_argument("--check", action="store_true", help="exit 1 unless every target is met")
    p.add_argument(
        "--private-servers",
        action="store_true",
        help="the stack `make run` starts: its private PostgreSQL and Redis (controlplane."
        "devservers) instead of --postgres/--redis",
    )
    return p.parse_args(argv)


def ms(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50_ms": None, "p99_ms": None}
    return {
        "p50_ms": round(statistics.median(values) * 1000, 3),
        "p99_ms": round(pct(values, 0.99) * 1000, 3),
    }


# ---------------------------------------------------------------- platform


class Caller:
    """POST and streamed POST through the lean client (default) or httpx."""

    def __init__(self, kind: str, port: int, key: str) -> None:
        self.kind = kind
        headers = {"Authorization": f"Bearer {key}"}
        if kind == "lean":
            self.lean = LeanClient("127.0.0.1", port, headers)
        else:
            import httpx

            limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
            self.httpx = httpx.AsyncClient(
                base_url=f"http://127.0.0.1:{port}", headers=headers, timeout=120, limits=limits
            )

    async def post(
        self, body: dict[str, Any], headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, str], Any]:
        if self.kind == "lean":
            response = await self.lean.post("/v1/completions", body, headers)
            return response.status, response.headers, response.json()
        answer = await self.httpx.post("/v1/completions", json=body, headers=headers)
        return answer.status_code, dict(answer.headers), answer.json()

    async def lines(self, body: dict[str, Any]) -> AsyncIterator[tuple[int, str]]:
        if self.kind == "lean":
            async for status, line in self.lean.stream_lines("/v1/completions", body):
                yield status, line
            return
        async with self.httpx.stream("POST", "/v1/completions", json=body) as response:
            async for line in response.aiter_lines():
                yield response.status_code, line

    async def close(self) -> None:
        if self.kind == "lean":
            await self.lean.close()
        else:
            await self.httpx.aclose()


async def one(client: Caller, tokens: int, *, stream: bool) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": MODEL_NAME,
        "prompt": PROMPT,
        "max_tokens": tokens,
        "temperature": 0,
    }
    started = time.perf_counter()
    if not stream:
        status, headers, data = await client.post(body)
        latency = time.perf_counter() - started
        if status != 200:
            raise SystemExit(f"POST /v1/completions answered {status}: {data}")
        return {
            "latency": latency,
            "ttft": None,
            "first_chunk": None,
            "tokens": data["usage"]["completion_tokens"],
            "processing_ms": float(headers.get("openai-processing-ms", "nan")),
            "queue_ms": float(headers.get("x-atelier-queue-ms", "nan")),
        }
    body.update(stream=True, stream_options={"include_usage": True})
    ttft = first_chunk = None
    produced = chunks = 0
    async for status, line in client.lines(body):  # read to the end: the connection is reused
        if status != 200:
            raise SystemExit(f"streaming POST answered {status}: {line}")
        if not line.startswith("data:"):
            continue
        payload = line[5:].strip()
        if payload == "[DONE]":
            continue
        chunk = json.loads(payload)
        choices = chunk.get("choices") or ()
        chunks += bool(choices)
        if first_chunk is None and choices:
            first_chunk = time.perf_counter() - started
        if ttft is None and any(c.get("text") for c in choices):
            ttft = time.perf_counter() - started
        if chunk.get("usage"):
            produced = chunk["usage"]["completion_tokens"]
    return {
        "latency": time.perf_counter() - started,
        "ttft": ttft,
        "first_chunk": first_chunk,
        "tokens": produced,
        "chunks": chunks,
        "processing_ms": None,
        "queue_ms": None,
    }


def cpu_now(pids: dict[str, int]) -> dict[str, float]:
    """CPU seconds so far of each process tree, and of this process (the client)."""
    return {**{k: tree_cpu(pid) for k, pid in pids.items()}, "client": time.process_time()}


def cpu_ms_per_request(before: dict[str, float], calls: int, pids: dict[str, int]) -> dict:
    after = cpu_now(pids)
    return {k: round((after[k] - before[k]) / calls * 1000, 2) for k in before}


class InProcessEngine:
    """The inference worker's `Engine` in this process, called one request at a time."""

    def __init__(self, model_dir: Path) -> None:
        from gpuworkers.inference.config import Settings
        from gpuworkers.inference.scheduler import Engine
        from gpuworkers.replies import MemoryChannel
        from jobcontracts.inference import ModelRef

        self.ref = ModelRef(
            id=MODEL_NAME,
            base_name=MODEL_NAME,
            base_uri=model_dir.as_uri(),
            family="llama",
            task="causal_lm",
            context_length=256,
        )
        self.channel = MemoryChannel()
        self.first: dict[str, float] = {}
        self.channel.listeners.append(self._seen)
        self.engine = Engine(Settings.from_env(), self.channel)
        self.call(4, stream=False)  # load

    def _seen(self, reply: Any) -> None:
        if reply.type == "delta":
            self.first.setdefault(reply.request_id, time.perf_counter())

    def call(self, tokens: int, *, stream: bool) -> float:
        """Seconds for the whole request, or to its first token when streaming."""
        request = make_request(self.ref, tokens, stream=stream)
        started = time.perf_counter()
        self.engine.submit(request).wait(120)
        self.channel.wait_final(request.request_id)
        if stream:
            return self.first.pop(request.request_id) - started
        return time.perf_counter() - started

    def close(self) -> None:
        self.engine.close()


async def measure_platform(
    args: argparse.Namespace,
    port: int,
    key: str,
    pids: dict[str, int],
    loaded: Any,
    engine: InProcessEngine,
) -> dict[str, Any]:
    client = Caller(args.client, port, key)
    try:
        # The worker loads the model on the first request; 503 until it answers.
        deadline = time.monotonic() + 180
        while True:
            status, _, answer = await client.post(
                {"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": args.tokens},
                headers={"x-atelier-timeout": "30"},
            )
            if status == 200:
                break
            if time.monotonic() > deadline:
                raise SystemExit(f"no 200 within 180 s: {status} {answer}")
            await asyncio.sleep(0.5)
        for stream in (False, True, False):  # warm both paths and the connection pool
            await asyncio.gather(*(one(client, args.tokens, stream=stream) for _ in range(8)))
        rows: dict[str, Any] = {}
        for stream in (False, True):
            suffix = " stream" if stream else ""
            if args.concurrent_only:
                rows[f"platform c={args.concurrency}{suffix}"] = await concurrent_rounds(
                    args, client, pids, loaded, stream=stream
                )
                continue
            # c=1, interleaved with the bare model in this process: request, bare call,
            # request, ... so both see the same machine (it is shared and noisy).
            # Also the worker's own engine in this process (no HTTP, no Redis, no worker
            # process): platform minus engine is what serving around the engine costs.
            before = cpu_now(pids)
            c1: list[dict[str, Any]] = []
            paired: list[float] = []
            engine_paired: list[float] = []
            bare_cpu = 0.0
            for _ in range(args.repeats):
                c1.append(await one(client, args.tokens, stream=stream))
                cpu_start = time.process_time()
                tokens = 1 if stream else args.tokens  # streams: time to the first token
                paired.append(bare.generate(loaded, [PROMPT], max_new_tokens=tokens).seconds)
                engine_paired.append(engine.call(args.tokens, stream=stream))
                bare_cpu += time.process_time() - cpu_start
            before["client"] += bare_cpu  # the baseline calls are not the client's CPU
            cpu = cpu_ms_per_request(before, len(c1), pids)
            rows[f"platform c=1{suffix}"] = {
                "calls": c1,
                "wall": None,
                "cpu": cpu,
                "bare": paired,
                "engine": engine_paired,
            }

            rows[f"platform c={args.concurrency}{suffix}"] = await concurrent_rounds(
                args, client, pids, loaded, stream=stream
            )
        return rows
    finally:
        await client.close()


async def concurrent_rounds(
    args: argparse.Namespace, client: Caller, pids: dict[str, int], loaded: Any, *, stream: bool
) -> dict[str, Any]:
    """`rounds` x (32 clients sending `each` requests back to back), each round between
    two bare batches of 32: its throughput against their mean. The machine's speed
    drifts by 2x within a minute; a ratio per round, and their median, follows it.
    """

    async def loop() -> list[dict[str, Any]]:
        return [await one(client, args.tokens, stream=stream) for _ in range(args.each)]

    calls: list[dict[str, Any]] = []
    walls: list[float] = []
    bare32: list[float] = []
    ratios: list[float] = []
    cpu_s: dict[str, float] = {}
    after_bare = bare_batch(loaded, args, rounds=1)[0]
    for _ in range(args.rounds):
        before_bare = after_bare
        before = cpu_now(pids)
        started = time.perf_counter()
        done = await asyncio.gather(*(loop() for _ in range(args.concurrency)))
        wall = time.perf_counter() - started
        after = cpu_now(pids)
        for k in before:
            cpu_s[k] = cpu_s.get(k, 0.0) + after[k] - before[k]
        after_bare = bare_batch(loaded, args, rounds=1)[0]
        baseline = (before_bare + after_bare) / 2
        flat = [r for client_rows in done for r in client_rows]
        calls += flat
        walls.append(wall)
        bare32.append(baseline)
        ratios.append(sum(c["tokens"] for c in flat) / wall / baseline)
    return {
        "calls": calls,
        "wall": sum(walls),
        "cpu": {k: round(v / len(calls) * 1000, 2) for k, v in cpu_s.items()},
        "bare32": bare32,
        "ratios": ratios,
    }


def bare_batch(loaded: Any, args: argparse.Namespace, rounds: int = 3) -> list[float]:
    """Tokens per second of `rounds` bare batches of `concurrency` prompts."""
    rates = []
    for _ in range(rounds):
        result = bare.generate(loaded, [PROMPT] * args.concurrency, max_new_tokens=args.tokens)
        rates.append(result.tokens / result.seconds)
    return rates


def bare_half(loaded: Any, args: argparse.Namespace) -> dict[str, list[float]]:
    """Seconds of `repeats` bare batch-1 generations, full length and max_tokens=1."""
    return {
        "full": [
            bare.generate(loaded, [PROMPT], max_new_tokens=args.tokens).seconds
            for _ in range(args.repeats)
        ],
        "first": [
            bare.generate(loaded, [PROMPT], max_new_tokens=1).seconds for _ in range(args.repeats)
        ],
    }


def start_inference_worker(
    env: dict[str, str], log: Path, threads: int, extra: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """`atelier worker inference` on the bench's stack; `extra` adds worker settings."""
    worker_env = {**env, "LOG_LEVEL": "WARNING", "TORCH_NUM_THREADS": str(threads), **(extra or {})}
    with log.open("wb") as out:
        return subprocess.Popen(
            [str(BIN / "atelier"), "worker", "inference"],
            env=worker_env,
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with private_servers(args, args.tmpdir):
        return measure(args)


def measure(args: argparse.Namespace) -> int:
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    os.environ["TORCH_NUM_THREADS"] = str(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    info = machine_info()
    for dist in ("torch", "transformers", "celery", "redis", "httpx"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            info["versions"][dist] = importlib.metadata.version(dist)
    began = datetime.now(UTC)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="atelier-bench-inference-", dir=args.tmpdir) as tmp:
        folder = Path(tmp)
        model_dir = tiny.build("llama", folder / "model", hidden=args.hidden, layers=args.layers)
        print(f"bare: {args.repeats} x batch 1, 5 x batch 32, {args.tokens} tokens", flush=True)
        bare1_first, bare32 = run_bare(model_dir, args.tokens, args.repeats)
        loaded = bare.load(model_dir)
        engine = InProcessEngine(model_dir)
        bare_tokens_1 = bare.generate(loaded, [PROMPT], max_new_tokens=args.tokens).tokens
        # batch 1 (full and max_tokens=1) again after the platform: the machine is shared,
        # so the baseline is both halves pooled, and each half is reported.
        halves = [bare_half(loaded, args)]
        data_dir = folder / "server"
        with platform_database(args, data_dir, name="inference") as env:
            manage(env, "import_base_model", str(model_dir), "--name", MODEL_NAME)
            with started_stack(env, data_dir / "logs") as stack:
                log = stack.log_dir / "inference.log"
                worker = start_inference_worker(env, log, args.threads)
                try:
                    key = sign_up(stack.port)
                    # Enterprise limits (6,000 requests/min): the free plan's 20/min would
                    # refuse the run. The limits are still checked on every request.
                    manage(
                        env,
                        "shell",
                        "-c",
                        "from controlplane.tenancy.models import Organization; "
                        "Organization.objects.update(plan='enterprise')",
                    )
                    print("platform: c=1 and c=32, non-streaming and streaming", flush=True)
                    pids = {
                        "web": stack.web.pid,
                        "inference": worker.pid,
                        "control": stack.worker.pid,
                    }
                    server = redis_pid(args.redis)
                    if server is not None:
                        pids["redis"] = server
                    measured = asyncio.run(
                        measure_platform(args, stack.port, key, pids, loaded, engine)
                    )
                except (Exception, SystemExit):
                    for name in ("web", "worker", "inference"):
                        print(f"{name} log (tail):\n{tail(stack.log_dir / f'{name}.log')}")
                    raise
                finally:
                    stop_server(worker)
        halves.append(bare_half(loaded, args))
        del loaded
        engine.close()
    elapsed = time.perf_counter() - t0

    full = [t for h in halves for t in h["full"]]
    bare_ttft = statistics.median(t for h in halves for t in h["first"]) * 1000
    bare1 = {**ms(full), "tokens_per_s": bare_tokens_1 * len(full) / sum(full)}
    bare_halves = [
        {
            "when": when,
            "batch1": ms(h["full"]),
            "ttft_p50_ms": round(statistics.median(h["first"]) * 1000, 3),
        }
        for when, h in zip(("before platform", "after platform"), halves, strict=True)
    ]
    rows: list[dict[str, Any]] = [
        {"name": "bare batch 1 (pooled)", **bare1},
        {"name": "bare batch 32", "tokens_per_s": bare32["tokens_per_s"]},
        {"name": "bare TTFT (max_tokens=1)", "ttft_p50_ms": bare_ttft},
    ]
    breakdown: dict[str, Any] = {}
    for name, value in measured.items():
        calls = value["calls"]
        row: dict[str, Any] = {"name": name, "requests": len(calls)}
        row.update(ms([c["latency"] for c in calls]))
        ttfts = [c["ttft"] for c in calls if c["ttft"] is not None]
        row["ttft_p50_ms"] = statistics.median(ttfts) * 1000 if ttfts else None
        row["ttft_p99_ms"] = pct(ttfts, 0.99) * 1000 if ttfts else None
        firsts = [c["first_chunk"] for c in calls if c["first_chunk"] is not None]
        # the first SSE chunk with a choice, even one whose text is still empty
        row["first_chunk_p50_ms"] = statistics.median(firsts) * 1000 if firsts else None
        produced = sum(c["tokens"] for c in calls)
        row["tokens_per_request"] = produced / len(calls)
        if any("chunks" in c for c in calls):
            row["chunks_per_stream_p50"] = statistics.median(c["chunks"] for c in calls)
        if value["wall"] is not None:
            row["tokens_per_s"] = produced / value["wall"]
            row["bare_batch32_per_round_tokens_per_s"] = value["bare32"]
            row["vs_bare_batch32_per_round"] = [round(r, 3) for r in value["ratios"]]
            row["vs_bare_batch32"] = statistics.median(value["ratios"])
            row["vs_bare_batch32_at_start"] = row["tokens_per_s"] / bare32["tokens_per_s"]
        else:
            row["tokens_per_s"] = produced / sum(c["latency"] for c in calls)
            interleaved = ms(value["bare"])
            row["bare_interleaved"] = interleaved
            row["engine_interleaved"] = engine_ms = ms(value["engine"])
            if row["ttft_p50_ms"] is None:
                row["overhead_p50_ms"] = row["p50_ms"] - interleaved["p50_ms"]
                row["overhead_p99_ms"] = row["p99_ms"] - interleaved["p99_ms"]
                pairs = [c["latency"] - b for c, b in zip(calls, value["bare"], strict=True)]
                row["overhead_paired_median_ms"] = statistics.median(pairs) * 1000
                row["overhead_vs_engine_p50_ms"] = row["p50_ms"] - engine_ms["p50_ms"]
                row["overhead_vs_engine_p99_ms"] = row["p99_ms"] - engine_ms["p99_ms"]
            else:  # streams: against the bare model's first token, interleaved
                row["ttft_overhead_ms"] = row["ttft_p50_ms"] - interleaved["p50_ms"]
                row["bare_ttft_interleaved_p50_ms"] = interleaved["p50_ms"]
                row["ttft_overhead_vs_engine_ms"] = row["ttft_p50_ms"] - engine_ms["p50_ms"]
        # where the time goes (medians; plain responses carry the gateway's timings)
        parts: dict[str, Any] = {}
        proc = [c for c in calls if c["processing_ms"] is not None]
        if proc:
            parts["queue_ms"] = statistics.median(c["queue_ms"] for c in proc)
            parts["openai_processing_ms"] = statistics.median(c["processing_ms"] for c in proc)
            parts["outside_view_ms"] = statistics.median(
                c["latency"] * 1000 - c["processing_ms"] for c in proc
            )
            parts["view_minus_queue_ms"] = statistics.median(
                c["processing_ms"] - c["queue_ms"] for c in proc
            )
        parts["first_chunk_p50_ms"] = row["first_chunk_p50_ms"]
        parts["chunks_per_stream_p50"] = row.get("chunks_per_stream_p50")
        parts["cpu_ms_per_request"] = value["cpu"]
        breakdown[name] = parts
        row["breakdown"] = parts
        rows.append(row)

    c1 = next((r for r in rows if r["name"] == "platform c=1"), {})
    c1s = next((r for r in rows if r["name"] == "platform c=1 stream"), {})
    c32 = next(r for r in rows if r["name"] == f"platform c={args.concurrency}")
    c32s = next(r for r in rows if r["name"] == f"platform c={args.concurrency} stream")
    targets = {
        "overhead_p50_c1_ms": (c1.get("overhead_p50_ms"), TARGET_OVERHEAD_P50_MS, "<="),
        "overhead_p99_c1_ms": (c1.get("overhead_p99_ms"), TARGET_OVERHEAD_P99_MS, "<="),
        "c32_vs_bare_batch32": (c32["vs_bare_batch32"], TARGET_C32_RATIO, ">="),
        "c32_stream_vs_bare_batch32": (c32s["vs_bare_batch32"], TARGET_C32_RATIO, ">="),
        "ttft_overhead_c1_ms": (c1s.get("ttft_overhead_ms"), TARGET_TTFT_OVERHEAD_MS, "<="),
    }
    verdicts = {
        name: {
            "value": value,
            "target": f"{op} {bound}",
            "met": value is not None and (value <= bound if op == "<=" else value >= bound),
        }
        for name, (value, bound, op) in targets.items()
    }

    def cell(value: float | None, fmt: str) -> str:
        width = int(fmt.split(".")[0] or 0)
        return format(value, fmt) if value is not None else "-".rjust(width)

    print(
        f"\nlocal llama (hidden {args.hidden}, {args.layers} layers), {args.tokens} max_tokens "
        f"(bare batch 1 produces {bare_tokens_1}), greedy, "
        f"{args.threads} torch thread(s), /v1/completions, {elapsed:.0f} s in all"
    )
    head = ("p50 ms", "p99 ms", "TTFT ms", "tok/s", "ovh p50", "ovh p99", "x bare32")
    print(f"{'':26}" + "".join(f"{h:>10}" for h in head))
    for row in rows:
        print(
            f"{row['name']:26}{cell(row.get('p50_ms'), '10.2f')}{cell(row.get('p99_ms'), '10.2f')}"
            f"{cell(row.get('ttft_p50_ms'), '10.2f')}{cell(row.get('tokens_per_s'), '10.0f')}"
            f"{cell(row.get('overhead_p50_ms'), '10.2f')}"
            f"{cell(row.get('overhead_p99_ms'), '10.2f')}"
            f"{cell(row.get('vs_bare_batch32'), '10.2f')}"
        )
    for row in rows:
        inter = row.get("bare_interleaved")
        if inter:
            what = "first token" if row.get("ttft_p50_ms") is not None else "whole request"
            eng = row["engine_interleaved"]
            print(
                f"{row['name']}, interleaved baselines ({what}): bare p50 {inter['p50_ms']:.2f}"
                f" p99 {inter['p99_ms']:.2f} ms; the worker's engine in-process p50 "
                f"{eng['p50_ms']:.2f} p99 {eng['p99_ms']:.2f} ms; platform - engine: p50 "
                f"{row['p50_ms' if what == 'whole request' else 'ttft_p50_ms'] - eng['p50_ms']:.2f}"
                + (
                    f" p99 {row['overhead_vs_engine_p99_ms']:.2f} ms"
                    if "overhead_vs_engine_p99_ms" in row
                    else " ms"
                )
            )
    for row in rows:
        if "vs_bare_batch32_per_round" in row:
            print(
                f"{row['name']}: {args.rounds} rounds of {args.concurrency} x {args.each} "
                "requests, each against the mean of the bare batches of "
                f"{args.concurrency} right before and after it: ratios "
                + " ".join(f"{r:.2f}" for r in row["vs_bare_batch32_per_round"])
                + " (bare: "
                + " ".join(f"{b:.0f}" for b in row["bare_batch32_per_round_tokens_per_s"])
                + f" tokens/s; against the run's first bare batches: "
                f"{row['vs_bare_batch32_at_start']:.2f})"
            )
    print("\nwhere the time goes (medians, ms):")
    print(
        f"{'':26}{'queue':>10}{'view':>10}{'gen+reply':>10}{'outside':>10}{'1st chunk':>10}"
        f"{'chunks':>8}"
        "   CPU ms/request: " + ", ".join(next(iter(breakdown.values()))["cpu_ms_per_request"])
    )
    for name, parts in breakdown.items():
        print(
            f"{name:26}{cell(parts.get('queue_ms'), '10.2f')}"
            f"{cell(parts.get('openai_processing_ms'), '10.1f')}"
            f"{cell(parts.get('view_minus_queue_ms'), '10.2f')}"
            f"{cell(parts.get('outside_view_ms'), '10.2f')}"
            f"{cell(parts.get('first_chunk_p50_ms'), '10.2f')}"
            f"{cell(parts.get('chunks_per_stream_p50'), '8.0f')}   "
            + ", ".join(f"{v:.1f}" for v in parts["cpu_ms_per_request"].values())
        )
    for h in bare_halves:
        print(
            f"bare batch 1 {h['when']}: p50 {h['batch1']['p50_ms']:.2f} ms, p99 "
            f"{h['batch1']['p99_ms']:.2f} ms, TTFT p50 {h['ttft_p50_ms']:.2f} ms"
        )
    print("\ntargets:")
    for name, v in verdicts.items():
        state = "MET" if v["met"] else "NOT MET"
        print(f"  {name:28} {cell(v['value'], '8.2f')}  target {v['target']:>7}: {state}")

    args.output.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "benchmark": "inference",
        "started_at": began.isoformat(),
        "seconds": round(elapsed, 1),
        "git": git_commit(),
        "machine": info,
        "settings": {
            "model": f"gpuworkers.models.tiny llama, hidden {args.hidden}, {args.layers} layers",
            "endpoint": "/v1/completions",
            "prompt": PROMPT,
            "max_tokens": args.tokens,
            "temperature": 0,
            "repeats_c1": args.repeats,
            "concurrency": args.concurrency,
            "requests_per_client_per_round": args.each,
            "rounds_c32": args.rounds,
            "concurrent_only": args.concurrent_only,
            "torch_threads": args.threads,
            "client": args.client,
            "web_concurrency": args.workers,
            "servers": args.servers,  # system, or the private ones make run starts
            "redis": args.redis if args.servers == "system" else "private",  # no password
            "env": args.env,
        },
        "bare_tokens_batch1": bare_tokens_1,
        "bare_batch1_run_bare_first": {k: bare1_first[k] for k in ("p50_ms", "p99_ms")},
        "bare_halves": bare_halves,
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        "rows": rows,
        "targets": verdicts,
    }
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.output}")
    return 1 if args.check and not all(v["met"] for v in verdicts.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
