"""The inference worker against the bare model: what the engine and Celery + Redis add.

    .venv/bin/python bench/inference_worker.py               # ~1 min on 2 cores
    .venv/bin/python bench/inference_worker.py --help

Same model, same prompts, greedy, in one run:

- bare: `gpuworkers.inference.bare.generate` (plain `model.generate`), batch 1 and 32;
- engine: the worker's `Engine` in this process (no broker), 1 request at a time and
  32 at once, non-streaming and streaming;
- worker: a real `atelier worker inference` process; each request is sent by task
  name through Redis and its replies read from Redis pub/sub, as the gateway does
  (no HTTP). Every request's usage report is read back off the `control` queue.

Latency is from sending to the final reply; TTFT to the first delta (streaming).
Overhead = p50 latency - bare batch-1 p50. Throughput at 32 = generated tokens /
wall time with 32 clients each sending its next request as soon as the last one
answers (a closed loop), against bare batch 32. It prints a table
and writes bench/results/inference_worker.json. (bench/inference.py adds the
HTTP gateway on top.)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "workers")]
BIN = Path(sys.executable).parent
PROMPT = "hello how can i help today your order has shipped"

from gpuworkers.inference import bare  # noqa: E402
from gpuworkers.inference.config import Settings  # noqa: E402
from gpuworkers.inference.scheduler import Engine  # noqa: E402
from gpuworkers.replies import MemoryChannel  # noqa: E402
from jobcontracts import queues  # noqa: E402
from jobcontracts.inference import (  # noqa: E402
    InferenceRequest,
    ModelRef,
    Params,
    UsageReport,
    reply_channel,
)


def model_dir(family: str) -> Path:
    from gpuworkers.models import tiny

    out = REPO / ".data" / "bench-models" / f"tiny-{family}"
    if not (out / "atelier.json").exists():
        tiny.build(family, out)
    return out


def make_request(ref: ModelRef, tokens: int, *, stream: bool) -> InferenceRequest:
    now = time.time()
    return InferenceRequest(
        request_id=f"bench-{uuid.uuid4().hex[:16]}",
        organization_id="org-bench",
        api_key_id=None,
        kind="completion",
        model=ref,
        params=Params(max_tokens=tokens, temperature=0.0),
        inputs=(PROMPT,),
        stream=stream,
        deadline=now + 120,
        sent_at=now,
    )


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class Result(dict[str, Any]):
    pass


def latency_row(name: str, latencies: list[float], ttfts: list[float], tokens: int) -> Result:
    return Result(
        name=name,
        p50_ms=statistics.median(latencies) * 1000,
        p99_ms=pct(latencies, 0.99) * 1000,
        ttft_p50_ms=statistics.median(ttfts) * 1000 if ttfts else None,
        tokens_per_s=tokens / sum(latencies),
    )


def closed_loop(call: Callable[[], int], clients: int = 32, each: int = 5) -> float:
    """Tokens per second with `clients` threads each calling `each` times back to back."""
    produced: list[int] = []
    lock = threading.Lock()

    def client() -> None:
        for _ in range(each):
            tokens = call()
            with lock:
                produced.append(tokens)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(produced) / (time.perf_counter() - started)


# -- bare ------------------------------------------------------------------------------


def run_bare(folder: Path, tokens: int, repeats: int) -> tuple[Result, Result]:
    model = bare.load(folder)
    for _ in range(3):
        bare.generate(model, [PROMPT], max_new_tokens=tokens)
    one = [bare.generate(model, [PROMPT], max_new_tokens=tokens) for _ in range(repeats)]
    single = latency_row("bare batch 1", [r.seconds for r in one], [], sum(r.tokens for r in one))
    batches = [bare.generate(model, [PROMPT] * 32, max_new_tokens=tokens) for _ in range(5)]
    wall = sum(r.seconds for r in batches)
    batch = Result(name="bare batch 32", tokens_per_s=sum(r.tokens for r in batches) / wall)
    return single, batch


# -- engine in this process ------------------------------------------------------------------


def run_engine(ref: ModelRef, tokens: int, repeats: int) -> list[Result]:
    channel = MemoryChannel()
    first_delta: dict[str, float] = {}
    channel.listeners.append(
        lambda r: (
            first_delta.setdefault(r.request_id, time.perf_counter()) if r.type == "delta" else None
        )
    )
    engine = Engine(Settings.from_env(), channel)
    results = []
    try:
        engine.submit(make_request(ref, tokens, stream=False)).wait(120)  # load
        for stream in (False, True):
            latencies, ttfts, produced = [], [], 0
            for _ in range(repeats):
                req = make_request(ref, tokens, stream=stream)
                started = time.perf_counter()
                usage = engine.submit(req).wait(120)
                channel.wait_final(req.request_id)
                latencies.append(time.perf_counter() - started)
                if stream:
                    ttfts.append(first_delta[req.request_id] - started)
                assert usage is not None
                produced += usage.completion_tokens
            label = "engine c=1" + (" stream" if stream else "")
            results.append(latency_row(label, latencies, ttfts, produced))

            def call(stream: bool = stream) -> int:
                usage = engine.submit(make_request(ref, tokens, stream=stream)).wait(120)
                return usage.completion_tokens if usage is not None else 0

            label = "engine c=32" + (" stream" if stream else "")
            results.append(Result(name=label, tokens_per_s=closed_loop(call)))
    finally:
        engine.close()
    return results


# -- a real worker over Redis ---------------------------------------------------------------


@contextmanager
def worker(redis_url: str, log: Path) -> Iterator[None]:
    env = {k: v for k, v in os.environ.items() if k != "DJANGO_SETTINGS_MODULE"}
    env.update(REDIS_URL=redis_url, PYTHONPATH=str(REPO / "workers"), PYTHONUNBUFFERED="1")
    with log.open("wb") as out:
        process = subprocess.Popen(
            [str(BIN / "atelier"), "worker", "inference"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
    try:
        deadline = time.monotonic() + 180
        while "inference.ready" not in log.read_text(errors="replace"):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(log.read_text()[-3000:])
            time.sleep(0.2)
        yield
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


class Client:
    """Sends requests by task name and reads replies from pub/sub, like the gateway."""

    def __init__(self, redis_url: str) -> None:
        import redis
        from celery import Celery

        from jobcontracts.broker import celery_config

        self.app = Celery("bench-client", fixups=[])
        self.app.conf.update(celery_config({"REDIS_URL": redis_url}))
        self.redis = redis.Redis.from_url(redis_url)
        self.pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
        self.pubsub.psubscribe(reply_channel("bench-*"))
        while self.pubsub.get_message(timeout=0.1) is not None:
            pass
        self.waiting: dict[str, tuple[threading.Event, list[float]]] = {}
        self.tokens: dict[str, int] = {}
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._listen, daemon=True)
        self.thread.start()

    def _listen(self) -> None:
        for message in self.pubsub.listen():
            if message["type"] != "pmessage":
                continue
            now = time.perf_counter()
            reply = json.loads(message["data"])
            with self.lock:
                entry = self.waiting.get(reply["request_id"])
            if entry is None:
                continue
            event, times = entry
            if reply["type"] == "delta" and len(times) == 0:
                times.append(now)
            if reply["type"] in ("done", "error"):
                usage = reply["data"].get("usage") or {}
                self.tokens[reply["request_id"]] = int(usage.get("completion_tokens") or 0)
                times.append(now)
                event.set()

    def call(self, request: InferenceRequest) -> tuple[float, float | None, int]:
        event: threading.Event = threading.Event()
        times: list[float] = []
        with self.lock:
            self.waiting[request.request_id] = (event, times)
        started = time.perf_counter()
        self.app.send_task(queues.INFER, args=[request.to_json()], queue=queues.GPU_INFERENCE)
        if not event.wait(120):
            raise TimeoutError(request.request_id)
        with self.lock:
            del self.waiting[request.request_id]
        ttft = times[0] - started if len(times) > 1 else None
        return times[-1] - started, ttft, self.tokens.pop(request.request_id)

    def usage_reports(self, ids: set[str], timeout: float = 60) -> dict[str, int]:
        from kombu import Exchange, Queue

        counts: dict[str, int] = {}
        queue = Queue(queues.CONTROL, Exchange(queues.CONTROL), routing_key=queues.CONTROL)
        deadline = time.monotonic() + timeout
        with self.app.connection_for_read() as conn, conn.SimpleQueue(queue) as control:
            while time.monotonic() < deadline and sum(counts.values()) < len(ids):
                try:
                    message = control.get(timeout=1)
                except control.Empty:
                    continue
                message.ack()
                if message.headers.get("task") != queues.CONTROL_USAGE_REPORT:
                    continue
                report = UsageReport.from_json(message.decode()[0][0])
                if report.request_id in ids:
                    counts[report.request_id] = counts.get(report.request_id, 0) + 1
        return counts


def run_worker(ref: ModelRef, tokens: int, repeats: int, redis_url: str) -> list[Result]:
    results = []
    sent: set[str] = set()
    with tempfile.TemporaryDirectory() as tmp, worker(redis_url, Path(tmp) / "worker.log"):
        client = Client(redis_url)

        def call(stream: bool) -> tuple[float, float | None, int]:
            req = make_request(ref, tokens, stream=stream)
            sent.add(req.request_id)
            return client.call(req)

        for _ in range(5):
            call(False)  # load, warm
        for stream in (False, True):
            timed = [call(stream) for _ in range(repeats)]
            ttfts = [t for _, t, _ in timed if t is not None]
            produced = sum(n for _, _, n in timed)
            label = "worker c=1" + (" stream" if stream else "")
            results.append(latency_row(label, [lat for lat, _, _ in timed], ttfts, produced))

            def loop_call(stream: bool = stream) -> int:
                return call(stream)[2]

            label = "worker c=32" + (" stream" if stream else "")
            results.append(Result(name=label, tokens_per_s=closed_loop(loop_call)))
        counts = client.usage_reports(sent)
        missing = len(sent) - len(counts)
        doubled = sum(1 for n in counts.values() if n > 1)
        results.append(Result(name="usage reports", missing=missing, duplicated=doubled))
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--family", default="llama", choices=("llama", "gpt2"))
    parser.add_argument("--tokens", type=int, default=32, help="max_tokens per request")
    parser.add_argument("--repeats", type=int, default=50, help="requests at concurrency 1")
    parser.add_argument("--redis-url", default=os.environ.get("REDIS_URL", ""))
    parser.add_argument("--skip-worker", action="store_true")
    parser.add_argument(
        "--out", type=Path, default=REPO / "bench" / "results" / "inference_worker.json"
    )
    args = parser.parse_args()
    os.environ.setdefault("TORCH_NUM_THREADS", "1")

    import torch

    torch.set_num_threads(int(os.environ["TORCH_NUM_THREADS"]))
    folder = model_dir(args.family)
    ref = ModelRef(
        id=f"tiny-{args.family}",
        base_name=f"tiny-{args.family}",
        base_uri=f"file://{folder}",
        family=args.family,
        task="causal_lm",
        context_length=256,
    )
    bare1, bare32 = run_bare(folder, args.tokens, args.repeats)
    rows = [bare1, bare32, *run_engine(ref, args.tokens, args.repeats)]
    if args.redis_url and not args.skip_worker:
        rows += run_worker(ref, args.tokens, args.repeats, args.redis_url)

    threads = torch.get_num_threads()
    print(f"tiny-{args.family}, {args.tokens} tokens a request, greedy, {threads} torch threads")
    header = ("p50 ms", "p99 ms", "TTFT ms", "tok/s", "overhead ms", "x bare32")
    print(f"{'':24} {header[0]:>8} {header[1]:>8} {header[2]:>8} {header[3]:>9} ", end="")
    print(f"{header[4]:>12} {header[5]:>9}")
    for row in rows:
        if row["name"] == "usage reports":
            print(f"usage reports: missing {row['missing']}, duplicated {row['duplicated']}")
            continue
        p50 = row.get("p50_ms")
        overhead = p50 - bare1["p50_ms"] if p50 is not None else None
        ratio = row["tokens_per_s"] / bare32["tokens_per_s"] if "c=32" in row["name"] else None
        row["overhead_ms"] = overhead
        row["vs_bare_batch32"] = ratio

        def cell(value: float | None, fmt: str) -> str:
            return format(value, fmt) if value is not None else "-"

        print(
            f"{row['name']:24} {cell(p50, '8.2f')} {cell(row.get('p99_ms'), '8.2f')} "
            f"{cell(row.get('ttft_p50_ms'), '8.2f')} {row['tokens_per_s']:9.0f} "
            f"{cell(overhead, '12.2f')} {cell(ratio, '9.2f')}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps({"tokens": args.tokens, "family": args.family, "rows": rows}, indent=2)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
