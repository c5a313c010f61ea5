"""The inference engine's settings, read from the environment (no torch here)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from gpuworkers.usage_spool import spool_dir_from_env
from jobcontracts.broker import data_dir


@dataclass(frozen=True)
class Settings:
    #: Sequences decoded together per model (a request with `n` takes n).
    max_batch: int = 32
    #: How long a batch about to start waits for requests known to be arriving.
    batch_wait_ms: float = 2.0
    #: How long new requests wait to join a running batch together (one prefill for all).
    join_wait_ms: float = 5.0
    #: Requests waiting (not yet decoding) beyond this are refused: 503 overloaded.
    max_queue: int = 256
    #: Prompt tokens (padded) prefilled in one forward.
    max_prefill_tokens: int = 16384
    #: Texts encoded in one forward (embeddings, classification).
    max_encode_batch: int = 64
    #: Loaded models (weights, adapters) are evicted beyond this; None: 75% of
    #: the GPU's memory, or 4096 MB on CPU.
    memory_budget_mb: float | None = None
    #: LoRA adapters kept loaded per base model.
    max_adapters: int = 64
    #: How often the cancel keys of running requests are read (one MGET). Every read
    #: takes the GIL from the decode loop: at 5 ms a tiny model decodes ~8% slower.
    cancel_check_ms: float = 20.0
    #: A stream's deltas after the first are sent at most this often (merged): fewer,
    #: larger messages when tokens come faster than this. 0: one message per token.
    #: 20 ms (50 updates a second) reads as smooth; measured at 32 concurrent streams
    #: on a small model, 5 ms spent a quarter of the throughput on messages.
    stream_interval_ms: float = 20.0
    #: With more than 8 streams open the interval grows in proportion (32 streams: 4x),
    #: up to this: each update carries more tokens when the worker is busiest, and the
    #: messages (worker, Redis, gateway, client) do not take the CPU the model needs.
    stream_interval_max_ms: float = 80.0
    #: With Redis, publish replies and poll cancellations from a child process
    #: (`gpuworkers.outbox_process`) instead of a thread that shares the engine's GIL.
    outbox_process: bool = True
    #: A started request silent this long gets a `heartbeat` reply (the gateway's
    #: INFERENCE_SILENCE_SECONDS must be longer).
    heartbeat_s: float = 5.0
    #: "cuda", "cuda:1", "cpu"; None: CUDA when available.
    device: str | None = None
    #: "bfloat16", "float16", "float32"; None: bf16 (or fp16) on CUDA, fp32 on CPU.
    dtype: str | None = None
    #: Torch CPU threads; None: torch's default.
    torch_threads: int | None = None
    #: Local copies of models and adapters that live in object storage.
    cache_dir: Path = Path(tempfile.gettempdir()) / "atelier-inference"
    #: Usage reports Redis did not take wait here (on disk) to be replayed.
    usage_spool_dir: Path = field(default_factory=spool_dir_from_env)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ

        def number(name: str, default: float) -> float:
            raw = env.get(name, "").strip()
            return float(raw) if raw else default

        def optional(name: str) -> str | None:
            return env.get(name, "").strip() or None

        budget = optional("INFERENCE_MEMORY_BUDGET_MB")
        threads = optional("TORCH_NUM_THREADS")
        cache = optional("INFERENCE_CACHE_DIR")
        return cls(
            max_batch=max(1, int(number("INFERENCE_MAX_BATCH", cls.max_batch))),
            batch_wait_ms=max(0.0, number("INFERENCE_BATCH_WAIT_MS", cls.batch_wait_ms)),
            join_wait_ms=max(0.0, number("INFERENCE_JOIN_WAIT_MS", cls.join_wait_ms)),
            max_queue=max(1, int(number("INFERENCE_MAX_QUEUE", cls.max_queue))),
            max_prefill_tokens=max(
                1, int(number("INFERENCE_MAX_PREFILL_TOKENS", cls.max_prefill_tokens))
            ),
            max_encode_batch=max(
                1, int(number("INFERENCE_MAX_ENCODE_BATCH", cls.max_encode_batch))
            ),
            memory_budget_mb=float(budget) if budget else None,
            max_adapters=max(1, int(number("INFERENCE_MAX_ADAPTERS", cls.max_adapters))),
            cancel_check_ms=max(0.5, number("INFERENCE_CANCEL_CHECK_MS", cls.cancel_check_ms)),
            stream_interval_ms=max(
                0.0, number("INFERENCE_STREAM_INTERVAL_MS", cls.stream_interval_ms)
            ),
            stream_interval_max_ms=max(
                0.0, number("INFERENCE_STREAM_INTERVAL_MAX_MS", cls.stream_interval_max_ms)
            ),
            outbox_process=env.get("INFERENCE_OUTBOX_PROCESS", "1").strip() != "0",
            heartbeat_s=max(0.05, number("INFERENCE_HEARTBEAT_SECONDS", cls.heartbeat_s)),
            device=optional("INFERENCE_DEVICE"),
            dtype=optional("INFERENCE_DTYPE"),
            torch_threads=max(1, int(threads)) if threads else None,
            cache_dir=Path(cache) if cache else data_dir(env) / "inference-cache",
            usage_spool_dir=spool_dir_from_env(env),
        )
