"""Dataset ingest: upload and validation throughput, worker memory, de-duplication speed.

    .venv/bin/python bench/ingest.py              # 100 MB and 1 GB files, ~3-4 min
    .venv/bin/python bench/ingest.py --quick      # 20 MB and 100 MB, ~1 min
    .venv/bin/python bench/ingest.py --help       # sizes, rounds, part size, sample rows…

The script generates realistic chat JSON Lines (system/user/assistant turns of
varied lengths, some code, some non-ASCII text, 2% exact and 3% near
duplicates; ~1.8 KB a row) and measures, for each file size:

- the bare baseline: read the file line by line and `orjson.loads` each line,
  no checks, in a fresh process;
- validation in-process: `validation.validate_stream` over the same file, in a
  fresh process, alternating with the baseline in ABBA order; each counts its
  best round (interference only ever slows a run down);
- the platform path, end to end: a throw-away PostgreSQL database, the real
  server (`atelier web`) and a real control worker (`atelier worker control`),
  a key from `POST /v1/signup`, a small warm-up upload, then the file through the
  resumable uploads API (create, 64 MiB parts, complete) and `GET /v1/files/{id}`
  polled until validation is done, twice. The RSS of the server and of every
  worker process (the prefork child that runs the task included) is sampled
  every 50 ms from /proc and VmHWM is read at the end; each size gets freshly
  started processes, so each peak is its own.

Then exact and near-duplicate detection speed (`preprocess`) on a sample of the
same rows, each measurement in a fresh process, 3 rounds in rotating order, the
median round counting, next to the bare pipeline (parse + write, no step on).
Absolute numbers depend on the (noisy, shared) machine; the ratios to the bare
parse and the bare pipeline, measured in the same run, are the result. It prints a table
and writes bench/results/ingest.json. Only loopback is used; temp files, the
database and the Redis keys it created are removed, and the processes it
started are stopped by their pid.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.metadata
import itertools
import json
import os
import random
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import orjson

# Shared rather than copied: the stack (`_stack`: throw-away database, server and
# workers as subprocesses, /proc readings) and the api_auth benchmark's helpers
# (sign-up, report metadata). This directory is on sys.path when the script runs.
from _stack import (
    Stack,
    proc_status,
    process_tree,
    rss_kb,
    started_stack,
    steal_seconds,
    tree_cpu,
)
from _stack import platform_database as stack_database
from api_auth import (
    HOST,
    REPO,
    git_commit,
    machine_info,
    sign_up,
    tail,
)

if TYPE_CHECKING:
    from controlplane.datasets.neardup import NearDuplicates

MB = 1_000_000  # sizes, throughput and memory are reported in decimal MB
MiB = 1024 * 1024
TARGET_VALIDATION_RATIO = 0.5  # validation >= 0.5 x the bare parse rate
TARGET_WORKER_PEAK_MB = 300.0  # peak RSS of the process running validation
TARGET_NEAR_ROWS_PER_S = 20_000.0
#: "Independent of file size": the peak at the largest size may exceed the peak at
#: the smallest by at most this fraction (allocator and page-cache noise).
PEAK_GROWTH_TOLERANCE = 0.10
SAMPLE_INTERVAL_S = 0.05

# ---------------------------------------------------------------- options


def parse_size(text: str) -> int:
    """'100M' -> 100_000_000 (decimal: K, M, G); a bare number is bytes."""
    text = text.strip().upper().removesuffix("B")
    scale = {"K": 1_000, "M": MB, "G": 1_000 * MB}.get(text[-1:], 1)
    number = text[:-1] if scale != 1 else text
    try:
        value = int(float(number) * scale)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 100M or 1G)") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"size must be positive: {text!r}")
    return value


def parse_sizes(text: str) -> list[int]:
    return sorted({parse_size(part) for part in text.split(",") if part.strip()})


def human(nbytes: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if nbytes >= scale:
            return (
                f"{nbytes / scale:g} {unit}"
                if nbytes % scale == 0
                else f"{nbytes / scale:.1f} {unit}"
            )
    return f"{nbytes:.0f} B"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument(
        "--sizes",
        type=parse_sizes,
        default=None,
        help="file sizes, decimal (default 100M,1G; --quick: 20M,100M)",
    )
    p.add_argument("--quick", action="store_true", help="20M,100M and a 50k-row dedup sample")
    p.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="rounds of bare parse + validation per size, in ABBA order; the best of "
        "each counts (default 3)",
    )
    p.add_argument(
        "--dedup-rows",
        type=int,
        default=None,
        help="rows in the de-duplication sample (default 200,000; --quick: 50,000)",
    )
    p.add_argument(
        "--dedup-rounds",
        type=int,
        default=3,
        help="rounds of the de-duplication measurements, each in a fresh process, in "
        "rotating order; the median of each counts (default 3)",
    )
    p.add_argument(
        "--part-size",
        type=parse_size,
        default=64 * MiB,
        help="upload part size (default 64 MiB, the server's default UPLOAD_PART_MAX_BYTES; "
        "a larger one raises it)",
    )
    p.add_argument(
        "--platform-rounds",
        type=int,
        default=2,
        help="uploads of each file through the server, validated by the worker; the best "
        "counts (default 2)",
    )
    p.add_argument("--skip-platform", action="store_true", help="no server, no worker")
    p.add_argument("--skip-dedup", action="store_true", help="no de-duplication measurements")
    p.add_argument(
        "--workers", type=int, default=1, help="server processes, WEB_CONCURRENCY (default 1)"
    )
    p.add_argument(
        "--postgres",
        default=os.environ.get("BENCH_POSTGRES_URL", "postgres://postgres@127.0.0.1:5432"),
        help="PostgreSQL server (no database part); env BENCH_POSTGRES_URL",
    )
    p.add_argument(
        "--database",
        default="atelier_bench_ingest",
        help="database to create, use and drop (default atelier_bench_ingest)",
    )
    p.add_argument(
        "--redis",
        default=os.environ.get("BENCH_INGEST_REDIS_URL", "redis://127.0.0.1:6379/13"),
        help="Redis for the cache, broker and results (default db 13: the tests use 15, "
        "api_auth 14); env BENCH_INGEST_REDIS_URL",
    )
    p.add_argument(
        "--tmpdir",
        type=Path,
        default=None,
        help="where the files and the server's data go (default: the system temp dir)",
    )
    p.add_argument(
        "--output",
        type=Path,
        default=REPO / "bench" / "results" / "ingest.json",
        help="JSON results file (default bench/results/ingest.json)",
    )
    p.add_argument(
        "--settings",
        default="controlplane.settings.local",
        help="DJANGO_SETTINGS_MODULE for server and worker (default controlplane.settings.local)",
    )
    p.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra environment for server and worker (repeatable)",
    )
    p.add_argument("--check", action="store_true", help="exit 1 unless every target is met")
    args = p.parse_args(argv)
    if args.sizes is None:
        args.sizes = [20 * MB, 100 * MB] if args.quick else [100 * MB, 1000 * MB]
    if args.dedup_rows is None:
        args.dedup_rows = 50_000 if args.quick else 200_000
    for item in args.env:
        if "=" not in item:
            p.error(f"--env takes NAME=VALUE, not {item!r}")
    if min(args.rounds, args.platform_rounds, args.dedup_rows, args.dedup_rounds, args.workers) < 1:
        p.error(
            "--rounds, --platform-rounds, --dedup-rows, --dedup-rounds and --workers "
            "must be positive"
        )
    return args


# ---------------------------------------------------------------- the data


def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


COMMON_WORDS = _words(
    "the of and to a in is that for it as with was on be by this are or from at an not have "
    "but which you they can more one all their there has we if will your when what so about "
    "model data training answer question example function value return code file use new time "
    "first then also like just how each other into than only could these two may way should "
    "because make over after most need well any where much through before must good long right "
    "list string number error test result user output input step check update run"
)
# Mid-frequency non-ASCII words: multi-byte UTF-8 in the JSON, as in real data.
FOREIGN_WORDS = _words(
    "café naïve über façade résumé Straße niño déjà señor crème 東京 日本語 データ 模型 学习 "
    "привет данные модель שלום مرحبا 😀 🚀 ✓ →"
)
CODE_SNIPPETS = (
    'def {name}(items):\n    """Return the {word} of the items."""\n'
    "    return [x for x in items if x]\n",
    'for (let i = 0; i < {name}.length; i++) {{\n  console.log("{word}", {name}[i]);\n}}\n',
    "SELECT {name}, COUNT(*) FROM {word}\nWHERE created_at > now() - interval '1 day'\n"
    "GROUP BY 1;\n",
    'import json\n\nwith open("{word}.json") as f:\n    {name} = json.load(f)\n'
    'print({name}["{word}"])\n',
)


class ChatRows:
    """Deterministic chat rows of varied shape: ~70% with a system prompt, one to three
    user/assistant turns, ~8% of assistant turns with a code block, a few non-ASCII words.

    2% of rows repeat an earlier row exactly and 3% repeat one with a single word
    changed (a near duplicate), so the de-duplication steps have something to find.
    """

    EXACT_RATE = 0.02
    NEAR_RATE = 0.03

    def __init__(self, seed: int = 1) -> None:
        self.random = random.Random(seed)
        r = self.random
        letters = "etaoinshrdlcumwfgypbvkjxqz"
        weights = [26, 19, 17, 16, 15, 14, 13, 12, 11, 9, 8, 6, 6, 5, 5, 5, 4, 4, 4, 3, 2, 2]
        weights += [1, 1, 1, 1]
        words = list(COMMON_WORDS)
        seen = set(words)
        while len(words) < 6000:
            word = "".join(r.choices(letters, weights, k=r.randint(2, 10)))
            if word not in seen:
                seen.add(word)
                words.append(word)
        for i, word in enumerate(FOREIGN_WORDS):  # mid-frequency ranks
            words.insert(200 + 37 * i, word)
        # Zipf-like word frequencies, then a pool of sentences rows are made of.
        cumulative = list(itertools.accumulate(1.0 / (r + 1) ** 1.05 for r in range(len(words))))
        self.words = words
        self.sentences = []
        for _ in range(40_000):
            chosen = r.choices(words, cum_weights=cumulative, k=r.randint(4, 25))
            end = r.choice(".....?!:")
            self.sentences.append(chosen[0].capitalize() + " " + " ".join(chosen[1:]) + end)
        self.system_prompts = [self._text(1, 4) for _ in range(40)]
        self.recent_lines: deque[bytes] = deque(maxlen=2048)
        self.recent_rows: deque[dict[str, Any]] = deque(maxlen=2048)
        self.counts = {"unique": 0, "exact": 0, "near": 0}

    def _text(self, low: int, high: int) -> str:
        r = self.random
        return " ".join(r.choices(self.sentences, k=r.randint(low, high)))

    def _assistant(self) -> str:
        r = self.random
        text = self._text(2, 14)
        if r.random() < 0.08:
            snippet = r.choice(CODE_SNIPPETS).format(
                name=r.choice(self.words[:400]), word=r.choice(self.words)
            )
            text += f"\n\n```\n{snippet}```\n\n" + self._text(1, 3)
        return text

    def _fresh(self) -> dict[str, Any]:
        r = self.random
        messages = []
        if r.random() < 0.7:
            messages.append({"role": "system", "content": r.choice(self.system_prompts)})
        for _ in range(r.choice((1, 1, 1, 2, 2, 3))):
            messages.append({"role": "user", "content": self._text(1, 6)})
            messages.append({"role": "assistant", "content": self._assistant()})
        return {"messages": messages}

    def _near(self, row: dict[str, Any]) -> dict[str, Any]:
        r = self.random
        messages = [dict(m) for m in row["messages"]]
        longest = max(messages, key=lambda m: len(m["content"]))
        words = longest["content"].split(" ")
        words[r.randrange(len(words))] = r.choice(self.words)
        longest["content"] = " ".join(words)
        return {"messages": messages}

    def __iter__(self) -> Iterator[bytes]:
        r = self.random
        dumps = orjson.dumps
        while True:
            x = r.random()
            if x < self.EXACT_RATE and self.recent_lines:
                self.counts["exact"] += 1
                yield r.choice(self.recent_lines)
                continue
            if x < self.EXACT_RATE + self.NEAR_RATE and self.recent_rows:
                row = self._near(r.choice(self.recent_rows))
                self.counts["near"] += 1
            else:
                row = self._fresh()
                self.counts["unique"] += 1
            line = dumps(row) + b"\n"
            self.recent_rows.append(row)
            self.recent_lines.append(line)
            yield line


@dataclass
class DataFile:
    path: Path
    bytes: int
    rows: int
    sha256: str
    injected: dict[str, int] = field(default_factory=dict)


def generate(
    folder: Path, sizes: list[int], sample_rows: int
) -> tuple[dict[int, DataFile], DataFile]:
    """One stream of rows; every file is a prefix of it ending on a row boundary.

    Returns the file of each size (at least that many bytes) and the dedup sample
    (the first `sample_rows` rows).
    """
    folder.mkdir(parents=True, exist_ok=True)
    master = folder / "rows.jsonl"
    rows = ChatRows(seed=1)
    pending = sorted(sizes)
    marks: dict[int, DataFile] = {}
    sample: DataFile | None = None
    digest = hashlib.sha256()
    written = count = 0
    buffer: list[bytes] = []
    buffered = 0
    with open(master, "wb") as out:
        for line in rows:
            buffer.append(line)
            buffered += len(line)
            count += 1
            if buffered >= 4 * MiB or (pending and written + buffered >= pending[0]):
                data = b"".join(buffer)
                digest.update(data)
                out.write(data)
                written += len(data)
                buffer, buffered = [], 0
            while pending and written >= pending[0]:
                size = pending.pop(0)
                marks[size] = DataFile(
                    folder / f"chat-{human(size).replace(' ', '')}.jsonl",
                    written,
                    count,
                    digest.hexdigest(),
                    dict(rows.counts),
                )
            if sample is None and count == sample_rows:
                if buffer:
                    data = b"".join(buffer)
                    digest.update(data)
                    out.write(data)
                    written += len(data)
                    buffer, buffered = [], 0
                sample = DataFile(
                    folder / "dedup-sample.jsonl", written, count, "", dict(rows.counts)
                )
            if not pending and sample is not None:
                break
    assert sample is not None
    # Every file is a prefix of the stream: copies first, then the stream itself
    # becomes the file that is all of it (if one is).
    wanted = [*marks.values(), sample]
    whole = next((f for f in wanted if f.bytes == written), None)
    for data_file in wanted:
        if data_file is not whole:
            copy_prefix(master, data_file)
    if whole is not None:
        master.rename(whole.path)
    else:
        master.unlink()
    return marks, sample


def copy_prefix(source: Path, target: DataFile) -> None:
    with open(source, "rb") as src, open(target.path, "wb") as dst:
        left = target.bytes
        while left:
            chunk = src.read(min(left, 8 * MiB))
            dst.write(chunk)
            left -= len(chunk)


# ---------------------------------------------------------------- in-process measurements


def child_measure(kind: str, path: str) -> dict[str, Any]:
    """Runs in a fresh interpreter (`--child`), so its peak RSS is its own."""
    # Imports first (only what the measurement needs): the timer covers the work only.
    if kind == "validate":
        from controlplane.datasets.validation import validate_stream
    elif kind != "parse":
        from controlplane.datasets import preprocess
        from controlplane.datasets.neardup import BATCH_CHARS, NearDuplicates
        from controlplane.datasets.preprocess import Recipe, preprocess_stream

    rss_start = rss_kb(os.getpid())
    if kind == "near-direct":
        batches = (BATCH_CHARS, preprocess._NEAR_BATCH_ROWS)
        return near_direct(NearDuplicates, batches, path, rss_start)
    cpu = cpu_self()
    started = time.perf_counter()
    result: dict[str, Any] = {}
    if kind == "parse":
        loads = orjson.loads
        rows = 0
        with open(path, "rb") as f:
            for line in f:
                loads(line)
                rows += 1
        result["rows"] = rows
    elif kind == "validate":
        with open(path, "rb") as f:
            report = validate_stream(f, filename=os.path.basename(path))
        result.update(rows=report.rows, ok=report.ok(), error_count=report.error_count)
    elif kind.startswith("preprocess-"):
        off = {"normalize": False, "drop_empty": False, "dedupe_exact": False}
        recipe = {
            "preprocess-copy": Recipe(**off),
            "preprocess-exact": Recipe(**{**off, "dedupe_exact": True}),
            "preprocess-near": Recipe(**off, dedupe_near=True),
        }[kind]
        with open(path, "rb") as src, open(os.devnull, "wb") as dst:
            pre = preprocess_stream(src, dst, format="chat", recipe=recipe)
        result.update(rows=pre.rows_in, rows_out=pre.rows_out, removed=pre.removed)
    else:
        raise SystemExit(f"unknown measurement {kind!r}")
    result["seconds"] = time.perf_counter() - started
    result["cpu_seconds"] = cpu_self() - cpu
    result["rss_start_kb"] = rss_start
    result["peak_rss_kb"] = peak_rss_self()
    return result


def peak_rss_self() -> int:
    """VmHWM in KiB. Not ru_maxrss: Linux carries that over from the parent across
    fork and exec, so every child would report at least the bench's own peak."""
    return proc_status(os.getpid()).get("VmHWM", 0)


def cpu_self() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def near_direct(
    near_duplicates: type[NearDuplicates], batches: tuple[int, int], path: str, rss_start: int
) -> dict[str, Any]:
    """`NearDuplicates.filter` alone, timed without the parsing, on two kinds of text:
    whole rows (message contents joined, what `preprocess_stream` compares) and
    short texts (each row's first user message), in batches as preprocess makes
    them (`batches`: at most so many characters, or so many rows)."""
    kinds = ("row", "short")
    most_chars, most_rows = batches
    index = {k: near_duplicates(0.9) for k in kinds}
    seconds = dict.fromkeys(kinds, 0.0)
    cpu_seconds = dict.fromkeys(kinds, 0.0)
    words = dict.fromkeys(kinds, 0)
    dropped = dict.fromkeys(kinds, 0)
    texts: dict[str, list[str]] = {k: [] for k in kinds}
    chars = dict.fromkeys(kinds, 0)
    rows = 0
    perf = time.perf_counter
    cpu = time.process_time

    def flush(k: str) -> None:
        words[k] += sum(len(t.split()) for t in texts[k])
        started, started_cpu = perf(), cpu()
        keep = index[k].filter(texts[k])
        seconds[k] += perf() - started
        cpu_seconds[k] += cpu() - started_cpu
        dropped[k] += keep.count(False)
        texts[k] = []
        chars[k] = 0

    with open(path, "rb") as f:
        for line in f:
            messages = orjson.loads(line)["messages"]
            row = "\n".join(m["content"] for m in messages)
            short = next(m["content"] for m in messages if m["role"] == "user")
            for k, text in (("row", row), ("short", short)):
                texts[k].append(text)
                chars[k] += len(text)
                if chars[k] >= most_chars or len(texts[k]) >= most_rows:
                    flush(k)
            rows += 1
    for k in kinds:
        flush(k)
    return {
        "rows": rows,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "words_per_row": {k: words[k] / rows for k in kinds},
        "near_duplicates": dropped,
        "rss_start_kb": rss_start,
        "peak_rss_kb": peak_rss_self(),
    }


def run_child(kind: str, path: Path) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--child", kind, str(path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )
    if out.returncode != 0:
        raise SystemExit(f"measurement {kind} on {path.name} failed:\n{out.stderr[-3000:]}")
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def rate(nbytes: float, seconds: float) -> float:
    return nbytes / MB / seconds if seconds > 0 else 0.0


def in_process(data: DataFile, rounds: int) -> dict[str, Any]:
    """Bare parse and validation, each in a fresh process, in ABBA order."""
    runs: dict[str, list[dict[str, Any]]] = {"parse": [], "validate": []}
    for r in range(rounds):
        for kind in ("parse", "validate") if r % 2 == 0 else ("validate", "parse"):
            steal = steal_seconds()
            result = run_child(kind, data.path)
            result["steal_s"] = steal_seconds() - steal
            if result["rows"] != data.rows or (kind == "validate" and not result["ok"]):
                raise SystemExit(f"{kind} of {data.path.name} disagrees with the file: {result}")
            runs[kind].append(result)
            print(
                f"  {human(data.bytes):>8} round {r + 1}/{rounds} {kind:<8} "
                f"{rate(data.bytes, result['seconds']):7.1f} MB/s",
                flush=True,
            )

    def summary(kind: str) -> dict[str, Any]:
        best = min(x["seconds"] for x in runs[kind])
        total = sum(x["seconds"] for x in runs[kind])
        best_cpu = min(x["cpu_seconds"] for x in runs[kind])
        return {
            "mb_per_s": round(rate(data.bytes, best), 1),
            "rows_per_s": round(data.rows / best),
            "mb_per_s_all_rounds": round(rate(data.bytes * rounds, total), 1),
            "mb_per_s_by_round": [round(rate(data.bytes, x["seconds"]), 1) for x in runs[kind]],
            "mb_per_cpu_s": round(rate(data.bytes, best_cpu), 1),
            "steal_s_by_round": [round(x["steal_s"], 2) for x in runs[kind]],
            "rss_start_mb": round(min(x["rss_start_kb"] for x in runs[kind]) * 1024 / MB, 1),
            "peak_rss_mb": round(max(x["peak_rss_kb"] for x in runs[kind]) * 1024 / MB, 1),
        }

    parse, validate = summary("parse"), summary("validate")
    ratio = validate["mb_per_s"] / parse["mb_per_s"]
    return {
        "bare_parse": parse,
        "validation": validate,
        "ratio": round(ratio, 3),
        "ratio_all_rounds": round(
            validate["mb_per_s_all_rounds"] / parse["mb_per_s_all_rounds"], 3
        ),
        "ratio_by_round": [
            round(v / p, 3)
            for v, p in zip(validate["mb_per_s_by_round"], parse["mb_per_s_by_round"], strict=True)
        ],
        "ratio_cpu": round(validate["mb_per_cpu_s"] / parse["mb_per_cpu_s"], 3),
        "target_met": ratio >= TARGET_VALIDATION_RATIO,
    }


def dedup(sample: DataFile, rounds: int) -> dict[str, Any]:
    """Each measurement in a fresh process, `rounds` times in rotating order. The median
    round counts (and is what the target is checked on); the best and every round are
    kept, and rows per CPU second, which interference from other processes moves less."""
    kinds = ("preprocess-copy", "preprocess-exact", "preprocess-near", "near-direct")
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in kinds}
    for r in range(rounds):
        for kind in kinds[r % len(kinds) :] + kinds[: r % len(kinds)]:
            result = run_child(kind, sample.path)
            runs[kind].append(result)
            if kind == "near-direct":
                line = ", ".join(
                    f"{text} {result['rows'] / result['seconds'][text]:,.0f}"
                    for text in ("row", "short")
                )
                print(f"  round {r + 1}/{rounds} near-direct: {line} rows/s", flush=True)
            else:
                rows_per_s = result["rows"] / result["seconds"]
                print(f"  round {r + 1}/{rounds} {kind:<17} {rows_per_s:10,.0f} rows/s", flush=True)

    def rates(seconds: list[float]) -> dict[str, Any]:
        by_round = [sample.rows / s for s in seconds]
        return {
            "rows_per_s": round(statistics.median(by_round)),
            "rows_per_s_best": round(max(by_round)),
            "rows_per_s_by_round": [round(v) for v in by_round],
        }

    results: dict[str, Any] = {
        "rows": sample.rows,
        "bytes": sample.bytes,
        "rounds": rounds,
        "injected": {k: sample.injected[k] for k in ("exact", "near")},
    }
    for kind in kinds[:3]:
        first = runs[kind][0]
        entry: dict[str, Any] = {
            **rates([x["seconds"] for x in runs[kind]]),
            "rows_per_cpu_s": round(
                statistics.median(sample.rows / x["cpu_seconds"] for x in runs[kind])
            ),
            "mb_per_s": round(
                rate(sample.bytes, statistics.median(x["seconds"] for x in runs[kind])), 1
            ),
            "rows_out": first["rows_out"],
            "removed": {k: v for k, v in first["removed"].items() if v},
            "rss_start_mb": round(min(x["rss_start_kb"] for x in runs[kind]) * 1024 / MB, 1),
            "peak_rss_mb": round(max(x["peak_rss_kb"] for x in runs[kind]) * 1024 / MB, 1),
        }
        results[kind.replace("-", "_")] = entry
    bare = results["preprocess_copy"]["rows_per_s"]
    for name in ("preprocess_exact", "preprocess_near"):
        results[name]["ratio_to_bare_pipeline"] = round(results[name]["rows_per_s"] / bare, 3)
    near = results["preprocess_near"]
    near["target_met"] = near["rows_per_s"] >= TARGET_NEAR_ROWS_PER_S
    direct = runs["near-direct"]
    for text in ("row", "short"):
        entry = {
            "what": "NearDuplicates.filter alone, "
            + ("whole rows" if text == "row" else "first user message of each row"),
            **rates([x["seconds"][text] for x in direct]),
            "rows_per_cpu_s": round(
                statistics.median(sample.rows / x["cpu_seconds"][text] for x in direct)
            ),
            "words_per_row": round(direct[0]["words_per_row"][text], 1),
            "near_duplicates": direct[0]["near_duplicates"][text],
        }
        entry["target_met"] = entry["rows_per_s"] >= TARGET_NEAR_ROWS_PER_S
        results[f"near_direct_{text}"] = entry
    return results


# ---------------------------------------------------------------- processes and memory


@dataclass
class Tracked:
    role: str
    pid: int
    samples: list[tuple[float, int]] = field(default_factory=list)  # (monotonic, RSS KiB)
    hwm_kb: int = 0


class MemorySampler:
    """Samples the RSS of every process under the given roots every 50 ms, in a thread.

    Children are looked up again every half second, so a worker's pool child
    (or a replacement) is picked up as soon as it exists.
    """

    def __init__(self, roots: dict[str, int]) -> None:
        self.roots = roots
        self.tracked: dict[int, Tracked] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _discover(self) -> None:
        for role, root in self.roots.items():
            for pid in process_tree(root):
                if pid not in self.tracked:
                    name = role if pid == root else f"{role} child"
                    self.tracked[pid] = Tracked(name, pid)

    def _run(self) -> None:
        tick = 0
        while not self._stop.is_set():
            if tick % 10 == 0:
                self._discover()
            now = time.monotonic()
            for t in list(self.tracked.values()):
                rss = rss_kb(t.pid)
                if rss:
                    t.samples.append((now, rss))
            tick += 1
            self._stop.wait(SAMPLE_INTERVAL_S)

    def __enter__(self) -> MemorySampler:
        self._discover()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop sampling and read each live process's VmHWM (its true peak)."""
        if self._thread.is_alive():
            self._stop.set()
            self._thread.join()
            self._discover()
            for t in self.tracked.values():
                status = proc_status(t.pid)
                t.hwm_kb = max(t.hwm_kb, status.get("VmHWM", 0))

    def peak_kb(self, pid: int, since: float = 0.0, until: float = float("inf")) -> int:
        samples = self.tracked[pid].samples
        return max((rss for at, rss in samples if since <= at <= until), default=0)

    def pids(self, role: str) -> list[int]:
        return [p for p, t in self.tracked.items() if t.role == role]


@contextlib.contextmanager
def platform_database(args: argparse.Namespace, data_dir: Path) -> Iterator[dict[str, str]]:
    """A migrated throw-away database; yields the environment server and worker share."""
    biggest = max(args.sizes)
    # Parts, the assembled file and Django's spooled request bodies all land here.
    (data_dir / "tmp").mkdir(parents=True, exist_ok=True)
    extra = {
        "CONTROL_CONCURRENCY": "1",  # one pool child: the task's process is that child
        "TMPDIR": str(data_dir / "tmp"),
        "MEDIA_ROOT": str(data_dir / "media"),
        "UPLOAD_MAX_BYTES": str(max(8 * 1024**3, biggest)),
        "UPLOAD_PART_MAX_BYTES": str(max(64 * MiB, args.part_size)),
        "ORG_STORAGE_QUOTA_BYTES": str(max(100 * 1024**3, 4 * sum(args.sizes))),
        "UPLOAD_TTL_SECONDS": "7200",
    }
    with stack_database(args, data_dir, name="ingest", extra_env=extra) as env:
        yield env


def api(client: httpx.Client, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
    response = client.request(method, path, **kwargs)
    if response.status_code != 200:
        raise SystemExit(f"{method} {path} answered {response.status_code}: {response.text[:500]}")
    return dict(response.json())


@dataclass
class Uploaded:
    file_id: str
    parts: int
    started: float  # perf_counter at the first part
    parts_done: float
    completed: float


def upload(client: httpx.Client, data: DataFile, part_size: int) -> Uploaded:
    """POST /v1/uploads, the parts (each read from disk as it is sent), then complete."""
    created = api(
        client,
        "POST",
        "/v1/uploads",
        json={
            "filename": data.path.name,
            "purpose": "fine-tune",
            "bytes": data.bytes,
            "mime_type": "application/jsonl",
            "sha256": data.sha256,
        },
    )
    part_ids = []
    started = time.perf_counter()
    with open(data.path, "rb") as f:
        while chunk := f.read(part_size):
            part = api(
                client,
                "POST",
                f"/v1/uploads/{created['id']}/parts",
                files={"data": ("part", chunk, "application/octet-stream")},
            )
            part_ids.append(part["id"])
            del chunk
    parts_done = time.perf_counter()
    done = api(client, "POST", f"/v1/uploads/{created['id']}/complete", json={"part_ids": part_ids})
    completed = time.perf_counter()
    if done["status"] != "completed" or not done["file"]:
        raise SystemExit(f"upload of {data.path.name} did not complete: {done}")
    return Uploaded(done["file"]["id"], len(part_ids), started, parts_done, completed)


def wait_validated(
    client: httpx.Client, file_id: str, data: DataFile
) -> tuple[dict[str, Any], int]:
    """Poll GET /v1/files/{id} every 50 ms until validation has finished; the file and polls."""
    polls = 0
    deadline = time.monotonic() + 3600
    while True:
        file = api(client, "GET", f"/v1/files/{file_id}")
        polls += 1
        if file["status"] in ("processed", "error"):
            break
        if time.monotonic() > deadline:
            raise SystemExit(f"validation of {file_id} did not finish within an hour")
        time.sleep(SAMPLE_INTERVAL_S)
    report = file["validation"] or {}
    if file["status"] != "processed" or report.get("rows") != data.rows:
        raise SystemExit(
            f"validation of {data.path.name} ended {file['status']} with "
            f"{report.get('rows')} rows, not {data.rows}: {file.get('status_details')}"
        )
    return file, polls


def warmup_file(data: DataFile, folder: Path) -> DataFile:
    """The first ~1 MB of rows: one small upload warms the server and the worker's pool
    child up (imports, database connection), as in a long-running deployment."""
    with open(data.path, "rb") as f:
        head = f.read(MB)
    head = head[: head.rindex(b"\n") + 1]
    path = folder / "warmup.jsonl"
    path.write_bytes(head)
    return DataFile(path, len(head), head.count(b"\n"), hashlib.sha256(head).hexdigest())


TASK_RUNTIME = re.compile(r"validate_file\[[0-9a-f-]+\] succeeded in ([0-9.]+)s")


def task_runtimes(log_path: Path) -> list[float]:
    """Celery's own run time of each validate_file task (worker log, INFO)."""
    with contextlib.suppress(OSError):
        return [float(x) for x in TASK_RUNTIME.findall(log_path.read_text(errors="replace"))]
    return []


def upload_and_validate(
    stack: Stack, key: str, data: DataFile, part_size: int, rounds: int, scratch: Path
) -> dict[str, Any]:
    """A warm-up upload, then `rounds` uploads of the file, each validated by the worker."""
    runs: list[dict[str, Any]] = []
    phases: list[tuple[str, float, float]] = []  # (phase, since, until), monotonic
    with httpx.Client(
        base_url=f"http://{HOST}:{stack.port}",
        headers={"Authorization": f"Bearer {key}"},
        timeout=httpx.Timeout(600.0, connect=10.0),
    ) as client:
        warm = warmup_file(data, scratch)
        warm_file = upload(client, warm, part_size).file_id
        wait_validated(client, warm_file, warm)
        api(client, "DELETE", f"/v1/files/{warm_file}")
        warm.path.unlink()
        with MemorySampler({"web": stack.web.pid, "worker": stack.worker.pid}) as memory:
            time.sleep(1.0)  # a second of idle samples: the processes' resting RSS
            phases.append(("idle", 0.0, time.monotonic()))
            for _ in range(rounds):
                web_cpu0, client_cpu0 = tree_cpu(stack.web.pid), time.process_time()
                mark_upload = time.monotonic()
                up = upload(client, data, part_size)
                mark_validation = time.monotonic()
                mark_complete = mark_validation - (up.completed - up.parts_done)
                web_cpu1, client_cpu1 = tree_cpu(stack.web.pid), time.process_time()
                # The task cannot start before completion commits; it may have just
                # started, so the worker's CPU below is a (close) lower bound.
                worker_cpu0, steal0 = tree_cpu(stack.worker.pid), steal_seconds()
                _, polls = wait_validated(client, up.file_id, data)
                validated = time.perf_counter()
                mark_end = time.monotonic()
                worker_cpu1, steal1 = tree_cpu(stack.worker.pid), steal_seconds()
                api(client, "DELETE", f"/v1/files/{up.file_id}")  # frees the disk
                phases += [
                    ("parts", mark_upload, mark_complete),
                    ("complete", mark_complete, mark_validation),
                    ("validation", mark_validation, mark_end),
                ]
                runtimes = task_runtimes(stack.log_dir / "worker.log")
                runs.append(
                    {
                        "upload_s": up.completed - up.started,
                        "parts_s": up.parts_done - up.started,
                        "complete_s": up.completed - up.parts_done,
                        "parts": up.parts,
                        "web_cpu_s": web_cpu1 - web_cpu0,
                        "client_cpu_s": client_cpu1 - client_cpu0,
                        "validation_s": validated - up.completed,
                        "task_s": runtimes[-1] if runtimes else None,
                        "worker_cpu_s": worker_cpu1 - worker_cpu0,
                        "steal_s": steal1 - steal0,
                        "polls": polls,
                    }
                )
            time.sleep(0.2)

    def mem(pid: int) -> dict[str, Any]:
        def peak(phase: str) -> float:
            kb = max(memory.peak_kb(pid, a, b) for name, a, b in phases if name == phase)
            return round(kb * 1024 / MB, 1)

        return {
            "pid": pid,
            "idle_mb": peak("idle"),
            "peak_parts_mb": peak("parts"),
            "peak_complete_mb": peak("complete"),
            "peak_validation_mb": peak("validation"),
            "peak_sampled_mb": round(memory.peak_kb(pid) * 1024 / MB, 1),
            "vmhwm_mb": round(memory.tracked[pid].hwm_kb * 1024 / MB, 1),
            "samples": len(memory.tracked[pid].samples),
        }

    processes = {
        "web": [mem(p) for p in memory.pids("web")],
        "web_children": [mem(p) for p in memory.pids("web child")],
        "worker_main": [mem(p) for p in memory.pids("worker")],
        "worker_children": [mem(p) for p in memory.pids("worker child")],
    }
    # The task ran in the pool child whose RSS grew most during validation.
    task = max(
        processes["worker_children"] or processes["worker_main"],
        key=lambda m: m["peak_validation_mb"] - m["idle_mb"],
    )

    def best(name: str) -> dict[str, Any]:
        return min(runs, key=lambda r: r[name])

    up_best, val_best = best("upload_s"), best("validation_s")
    task_times = [r["task_s"] for r in runs if r["task_s"] is not None]
    return {
        "bytes": data.bytes,
        "rows": data.rows,
        "rounds": rounds,
        "upload": {
            "what": "client wall time from the first part to the complete response; best round",
            "parts": up_best["parts"],
            "part_bytes": part_size,
            "seconds": round(up_best["upload_s"], 3),
            "mb_per_s": round(rate(data.bytes, up_best["upload_s"]), 1),
            "parts_mb_per_s": round(rate(data.bytes, up_best["parts_s"]), 1),
            "complete_mb_per_s": round(rate(data.bytes, up_best["complete_s"]), 1),
            "mb_per_s_by_round": [round(rate(data.bytes, r["upload_s"]), 1) for r in runs],
            "web_cpu_s": round(up_best["web_cpu_s"], 2),
            "client_cpu_s": round(up_best["client_cpu_s"], 2),
        },
        "validation": {
            "what": "from the complete response until GET /v1/files/{id} says processed "
            "(polled every 50 ms); best round",
            "seconds": round(val_best["validation_s"], 3),
            "mb_per_s": round(rate(data.bytes, val_best["validation_s"]), 1),
            "mb_per_s_by_round": [round(rate(data.bytes, r["validation_s"]), 1) for r in runs],
            "task_mb_per_s": round(rate(data.bytes, min(task_times)), 1) if task_times else None,
            "task_seconds_by_round": [round(t, 3) for t in task_times],
            "mb_per_cpu_s": round(rate(data.bytes, min(r["worker_cpu_s"] for r in runs)), 1),
            "steal_s_by_round": [round(r["steal_s"], 2) for r in runs],
            "polls": val_best["polls"],
        },
        "memory": {
            "task_process_peak_mb": max(task["vmhwm_mb"], task["peak_sampled_mb"]),
            "task_process_idle_mb": task["idle_mb"],
            "task_process_pid": task["pid"],
            "web_peak_mb": max(max(m["vmhwm_mb"], m["peak_sampled_mb"]) for m in processes["web"]),
            # An upper bound: pages the pool child shares with the main process count twice.
            "worker_total_peak_mb": round(
                sum(
                    max(m["vmhwm_mb"], m["peak_sampled_mb"])
                    for m in processes["worker_main"] + processes["worker_children"]
                ),
                1,
            ),
            "processes": processes,
        },
    }


def platform(
    args: argparse.Namespace, files: dict[int, DataFile], data_dir: Path
) -> dict[str, Any]:
    results: dict[str, Any] = {}
    key: str | None = None
    with platform_database(args, data_dir) as env:
        for size in args.sizes:
            data = files[size]
            with started_stack(env, data_dir / "logs" / str(size)) as stack:
                if key is None:
                    key = sign_up(stack.port)
                try:
                    result = upload_and_validate(
                        stack, key, data, args.part_size, args.platform_rounds, data_dir
                    )
                except (Exception, SystemExit):  # not Ctrl-C: the user knows why it stopped
                    for name in ("web", "worker"):
                        print(f"{name} log (tail):\n{tail(stack.log_dir / f'{name}.log')}")
                    raise
            results[str(size)] = result
            u, v, m = result["upload"], result["validation"], result["memory"]
            print(
                f"  {human(size):>8} upload {u['mb_per_s']:6.1f} MB/s ({u['parts']} parts "
                f"{u['parts_mb_per_s']:.1f} MB/s, complete {u['complete_mb_per_s']:.1f} MB/s); "
                f"validation {v['mb_per_s']:6.1f} MB/s; task process peak "
                f"{m['task_process_peak_mb']:.0f} MB, web {m['web_peak_mb']:.0f} MB",
                flush=True,
            )
    return results


# ---------------------------------------------------------------- report


def print_table(results: dict[str, Any]) -> None:
    header = (
        "size",
        "bare parse MB/s",
        "validate MB/s",
        "validate/parse",
        "upload MB/s",
        "worker validate MB/s",
        "worker/parse",
        "task peak MB",
        "web peak MB",
    )
    rows = []
    for size in results["settings"]["sizes"]:
        ip = results["in_process"][str(size)]
        pl = results["platform"].get(str(size))
        rows.append(
            (
                human(size),
                f"{ip['bare_parse']['mb_per_s']:.1f}",
                f"{ip['validation']['mb_per_s']:.1f}",
                f"{ip['ratio']:.2f}",
                f"{pl['upload']['mb_per_s']:.1f}" if pl else "-",
                f"{pl['validation']['mb_per_s']:.1f}" if pl else "-",
                f"{pl['validation']['ratio_to_bare_parse']:.2f}" if pl else "-",
                f"{pl['memory']['task_process_peak_mb']:.0f}" if pl else "-",
                f"{pl['memory']['web_peak_mb']:.0f}" if pl else "-",
            )
        )
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(header)]
    line = "  ".join(f"{{:{'<' if i == 0 else '>'}{w}}}" for i, w in enumerate(widths))
    print()
    print(line.format(*header))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print(line.format(*row))
    if results["platform"]:
        print()
        print("through the platform (best of the rounds):")
    for size, pl in results["platform"].items():
        u, v, m = pl["upload"], pl["validation"], pl["memory"]
        web = m["processes"]["web"][0]
        print(
            f"  {human(int(size))}: upload {u['mb_per_s']:.1f} MB/s = {u['parts']} parts at "
            f"{u['parts_mb_per_s']:.1f} MB/s + complete at {u['complete_mb_per_s']:.1f} MB/s "
            f"(server CPU {u['web_cpu_s']:.1f} s, client CPU {u['client_cpu_s']:.1f} s); "
            f"validation {v['mb_per_s']:.1f} MB/s end to end, "
            f"{v['task_mb_per_s'] or 0:.1f} MB/s as the task's own run time"
        )
        print(
            f"  {' ' * len(human(int(size)))}  RSS idle -> peak: task process "
            f"{m['task_process_idle_mb']:.0f} -> {m['task_process_peak_mb']:.0f} MB, "
            f"worker main + children {m['worker_total_peak_mb']:.0f} MB, "
            f"web {web['idle_mb']:.0f} -> {m['web_peak_mb']:.0f} MB"
        )
    d = results.get("dedup")
    if d:
        print()
        print(
            f"de-duplication, {d['rows']:,} chat rows ({human(d['bytes'])}), median of "
            f"{d.get('rounds', 1)} rounds (rows per CPU second in brackets):"
        )
        for name, label in (
            ("preprocess_copy", "preprocess, every step off (parse + write)"),
            ("preprocess_exact", "preprocess, exact dedup only"),
            ("preprocess_near", "preprocess, near dedup only"),
            ("near_direct_row", "NearDuplicates.filter, whole rows"),
            ("near_direct_short", "NearDuplicates.filter, short texts"),
        ):
            e = d[name]
            words = f" ({e['words_per_row']:.0f} words/row)" if "words_per_row" in e else ""
            met = ""
            if "target_met" in e:
                met = f"  target >= {TARGET_NEAR_ROWS_PER_S:,.0f}: " + (
                    "MET" if e["target_met"] else "NOT MET"
                )
            cpu = f" ({e['rows_per_cpu_s']:,})" if "rows_per_cpu_s" in e else ""
            print(f"  {label + words:<56} {e['rows_per_s']:>9,} rows/s{cpu:>10}{met}")
    print()
    for t in results["targets"]:
        print(
            f"{t['name']}: {t['value']}   target {t['target']}: {'MET' if t['met'] else 'NOT MET'}"
        )


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    sizes = results["settings"]["sizes"]
    ratios = [results["in_process"][str(s)]["ratio"] for s in sizes]
    out.append(
        {
            "name": "validation / bare parse, in-process",
            "value": ", ".join(f"{r:.2f}" for r in ratios),
            "target": f">= {TARGET_VALIDATION_RATIO}",
            "met": min(ratios) >= TARGET_VALIDATION_RATIO,
        }
    )
    platform_results = results["platform"]
    if platform_results:
        ratios = [platform_results[str(s)]["validation"]["ratio_to_bare_parse"] for s in sizes]
        out.append(
            {
                "name": "validation / bare parse, through the worker",
                "value": ", ".join(f"{r:.2f}" for r in ratios),
                "target": f">= {TARGET_VALIDATION_RATIO}",
                "met": min(ratios) >= TARGET_VALIDATION_RATIO,
            }
        )
        peaks = [platform_results[str(s)]["memory"]["task_process_peak_mb"] for s in sizes]
        out.append(
            {
                "name": "worker peak RSS (MB, process running validation)",
                "value": ", ".join(
                    f"{human(s)}: {p:.0f}" for s, p in zip(sizes, peaks, strict=True)
                ),
                "target": f"<= {TARGET_WORKER_PEAK_MB:.0f}",
                "met": max(peaks) <= TARGET_WORKER_PEAK_MB,
            }
        )
        if len(sizes) > 1:
            growth = peaks[-1] / peaks[0] - 1
            out.append(
                {
                    "name": f"worker peak growth {human(sizes[0])} -> {human(sizes[-1])}",
                    "value": f"{growth:+.1%}",
                    "target": f"<= {PEAK_GROWTH_TOLERANCE:.0%}",
                    "met": growth <= PEAK_GROWTH_TOLERANCE,
                }
            )
    d = results.get("dedup")
    if d:
        for name, label in (
            ("preprocess_near", "whole chat rows"),
            ("near_direct_short", "short texts"),
        ):
            out.append(
                {
                    "name": f"near-duplicate detection rows/s (median), {label}",
                    "value": f"{d[name]['rows_per_s']:,}",
                    "target": f">= {TARGET_NEAR_ROWS_PER_S:,.0f}",
                    "met": d[name]["target_met"],
                }
            )
    return out


def free_disk_check(folder: Path, args: argparse.Namespace) -> int:
    """Bytes needed: the files, plus the server's copies of the largest one (parts,
    the assembled file, a spooled request body), plus a margin."""
    biggest = max(args.sizes)
    needed = int(sum(args.sizes) + args.dedup_rows * 2000 + 2 * biggest + 3 * args.part_size)
    needed += 1000 * MB
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise SystemExit(
            f"not enough free disk in {folder}: {human(free)} free, about {human(needed)} needed "
            "(use --tmpdir, or smaller --sizes)"
        )
    return needed


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        print(json.dumps(child_measure(argv[1], argv[2])))
        return 0
    args = parse_args(argv)
    # SIGTERM unwinds like Ctrl-C: the server, the worker, the database and the files go.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    info = machine_info()
    for dist in ("orjson", "numpy", "datasketch", "celery", "redis"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            info["versions"][dist] = importlib.metadata.version(dist)
    started = datetime.now(UTC)
    t0 = time.perf_counter()
    print(
        f"atelier ingest bench: sizes {', '.join(human(s) for s in args.sizes)}, "
        f"{args.rounds} rounds, dedup sample {args.dedup_rows:,} rows",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="atelier-bench-ingest-", dir=args.tmpdir) as tmp:
        folder = Path(tmp)
        needed = free_disk_check(folder, args)
        print(
            f"generating chat JSONL in {folder} (needs about {human(needed)} of disk)", flush=True
        )
        gen_started = time.perf_counter()
        files, sample = generate(folder / "data", args.sizes, args.dedup_rows)
        gen_s = time.perf_counter() - gen_started
        largest = files[max(files)]
        print(
            f"  {human(largest.bytes)}, {largest.rows:,} rows "
            f"({largest.bytes / largest.rows:.0f} bytes/row) in {gen_s:.1f} s",
            flush=True,
        )
        print("bare parse vs validation, each in a fresh process:", flush=True)
        in_proc = {str(s): in_process(files[s], args.rounds) for s in args.sizes}
        dedup_results: dict[str, Any] | None = None
        if not args.skip_dedup:
            print(f"de-duplication on {sample.rows:,} rows:", flush=True)
            dedup_results = dedup(sample, args.dedup_rounds)
        sample.path.unlink(missing_ok=True)
        platform_results: dict[str, Any] = {}
        if not args.skip_platform:
            print(
                "platform: upload (resumable uploads API) + validation (control worker):",
                flush=True,
            )
            platform_results = platform(args, files, folder / "server")
            for size, result in platform_results.items():
                bare = in_proc[size]["bare_parse"]
                v = result["validation"]
                v["ratio_to_bare_parse"] = round(v["mb_per_s"] / bare["mb_per_s"], 3)
                v["ratio_to_bare_parse_cpu"] = round(v["mb_per_cpu_s"] / bare["mb_per_cpu_s"], 3)
    results: dict[str, Any] = {
        "benchmark": "ingest",
        "date": started.isoformat(timespec="seconds"),
        "git": git_commit(),
        "machine": info,
        "settings": {
            "sizes": args.sizes,
            "rounds": args.rounds,
            "round_order": "ABBA (bare parse first in odd rounds); MB/s is the best round's",
            "part_bytes": args.part_size,
            "dedup_rows": args.dedup_rows,
            "dedup_rounds": args.dedup_rounds,
            "rss_sample_interval_s": SAMPLE_INTERVAL_S,
            "platform_rounds": args.platform_rounds,
            "server": f"atelier web (uvicorn, WEB_CONCURRENCY={args.workers}, LOG_LEVEL=WARNING) "
            "+ atelier worker control (CONTROL_CONCURRENCY=1, LOG_LEVEL=INFO for the task run "
            "times), DEBUG=false, local files, PostgreSQL + Redis on loopback; fresh processes "
            "for each size, warmed up by a ~1 MB upload; best of the rounds",
            "django_settings_module": args.settings,
            "extra_env": sorted(args.env),
            "units": "MB = 10^6 bytes (sizes, throughput, memory)",
        },
        "data": {
            "generator": "ChatRows(seed=1): chat rows, 2% exact and 3% near duplicates",
            "generate_seconds": round(gen_s, 1),
            "files": {
                str(s): {
                    "bytes": files[s].bytes,
                    "rows": files[s].rows,
                    "bytes_per_row": round(files[s].bytes / files[s].rows),
                    "sha256": files[s].sha256,
                }
                for s in args.sizes
            },
        },
        "in_process": in_proc,
        "platform": platform_results,
        "dedup": dedup_results,
        "targets": [],
        "total_seconds": 0.0,
    }
    results["targets"] = targets(results)
    results["all_targets_met"] = all(t["met"] for t in results["targets"])
    results["total_seconds"] = round(time.perf_counter() - t0, 1)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print_table(results)
    shown = args.output.relative_to(REPO) if args.output.is_relative_to(REPO) else args.output
    print(f"wrote {shown} ({results['total_seconds']:.0f} s)")
    if args.check and not results["all_targets_met"]:
        return 1
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted; cleaned up", file=sys.stderr)
        sys.exit(130)
