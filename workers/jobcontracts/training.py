"""The fine-tuning contract: what the control plane sends a GPU worker, and what comes back.

The control plane sends `TrainingSpec.to_json()` as the only argument of the task
`queues.TRAIN` on queue `gpu.training`. The worker reports with `Report.to_json()`
as the only argument of `queues.CONTROL_JOB_REPORT` on queue `control`.

Storage is addressed by URI: `file:///abs/path` for the local filesystem and
`s3://bucket/key` for S3 (endpoint and credentials come from the worker's own
environment, never from the message).

Control signals travel the other way through storage, not the broker: the control
plane writes a small JSON `Signal` at `TrainingSpec.control_uri`, and the worker
reads it at step boundaries (every `control_poll_seconds`). That works with every
broker and storage backend, needs no database on the GPU host, and fences a stale
attempt: a worker whose attempt is no longer the signal's stops at once.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from typing import Any, Final, Literal

TASKS: Final = ("causal_lm", "classification")
METHODS: Final = ("supervised", "dpo")
#: A held-out test split of the training file takes at most this fraction of its rows.
MAX_TEST_FRACTION: Final = 0.5
#: Dataset formats the engine reads (same names as the control plane's validation).
DATA_FORMATS: Final = ("chat", "prompt_completion", "preference", "classification", "text")

Task = Literal["causal_lm", "classification"]
Method = Literal["supervised", "dpo"]

# Report kinds, in the order a healthy attempt sends them.
STARTED: Final = "started"
PROGRESS: Final = "progress"  # step, loss, tokens/s, ETA; doubles as the heartbeat
METRICS: Final = "metrics"  # evaluation on the validation set
CHECKPOINT: Final = "checkpoint"
SUCCEEDED: Final = "succeeded"
FAILED: Final = "failed"
PAUSED: Final = "paused"
CANCELLED: Final = "cancelled"
HEARTBEAT: Final = "heartbeat"  # sent while no step finishes (model loading, evaluation)
REPORT_KINDS: Final = (
    STARTED,
    PROGRESS,
    METRICS,
    CHECKPOINT,
    SUCCEEDED,
    FAILED,
    PAUSED,
    CANCELLED,
    HEARTBEAT,
)
#: Kinds after which the attempt sends nothing more.
FINAL_KINDS: Final = (SUCCEEDED, FAILED, PAUSED, CANCELLED)

# Signal actions.
RUN: Final = "run"
PAUSE: Final = "pause"
CANCEL: Final = "cancel"
SIGNAL_ACTIONS: Final = (RUN, PAUSE, CANCEL)


@dataclass(frozen=True)
class BaseModelRef:
    name: str
    #: A Hugging Face-format directory (config.json, *.safetensors, tokenizer files).
    uri: str
    family: str
    context_length: int


@dataclass(frozen=True)
class DataRef:
    uri: str
    format: str  # one of DATA_FORMATS


@dataclass(frozen=True)
class Hyperparameters:
    n_epochs: int
    batch_size: int
    learning_rate: float
    max_seq_len: int
    seed: int
    #: DPO temperature; ignored for supervised training.
    beta: float = 0.1
    weight_decay: float = 0.0
    warmup_ratio: float = 0.0
    #: Batches of rows of similar length (seeded; a resumed job sees the same batches).
    group_by_length: bool = True
    #: Causal LM: pack each batch's rows into few sequences, no attention across rows.
    packing: bool = False


@dataclass(frozen=True)
class LoraConfig:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    #: Module names; empty means the engine picks the model family's attention projections.
    target_modules: tuple[str, ...] = ()


@dataclass(frozen=True)
class TrainingSpec:
    job_id: str
    attempt: int
    organization_id: str
    task: str  # one of TASKS
    method: str  # one of METHODS
    base_model: BaseModelRef
    training_data: DataRef
    hyperparameters: Hyperparameters
    #: Prefix (a "directory" URI) under which checkpoints and the final artifact are written:
    #: `{output_uri}/checkpoints/step-{n:08d}/…` and `{output_uri}/final/…`.
    output_uri: str
    #: Where the control plane writes the job's `Signal`.
    control_uri: str
    validation_data: DataRef | None = None
    #: None means a full fine-tune.
    adapter: LoraConfig | None = None
    #: Classification label names, index = class id.
    labels: tuple[str, ...] = ()
    #: A checkpoint directory URI to resume from (model, optimizer and step state).
    resume_from: str | None = None
    #: Devices to train on; more than one launches torch's distributed launcher.
    gpus: int = 1
    checkpoint_every_steps: int = 50
    #: Also checkpoint when this long has passed since the last one (0 = only by steps).
    checkpoint_every_seconds: float = 0.0
    #: Held-out test data, evaluated once at the end (never trained on).
    test_data: DataRef | None = None
    #: Or: hold out this fraction of the training rows as the test set (0 = none); which
    #: rows is `held_out_rows(rows, test_fraction, hyperparameters.seed)`.
    test_fraction: float = 0.0
    eval_every_steps: int = 0  # 0 = once per epoch
    heartbeat_seconds: float = 10.0
    control_poll_seconds: float = 1.0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TrainingSpec:
        data = dict(data)
        data["base_model"] = BaseModelRef(**data["base_model"])
        data["training_data"] = DataRef(**data["training_data"])
        for name in ("validation_data", "test_data"):
            if data.get(name) is not None:
                data[name] = DataRef(**data[name])
        data["hyperparameters"] = Hyperparameters(**data["hyperparameters"])
        if data.get("adapter") is not None:
            adapter = dict(data["adapter"])
            adapter["target_modules"] = tuple(adapter.get("target_modules") or ())
            data["adapter"] = LoraConfig(**adapter)
        data["labels"] = tuple(data.get("labels") or ())
        spec = cls(**data)
        spec.check()
        return spec

    def check(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}")
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}")
        if self.training_data.format not in DATA_FORMATS:
            raise ValueError(f"unknown data format {self.training_data.format!r}")
        if self.task == "classification" and len(self.labels) < 2:
            raise ValueError("a classification job needs at least two labels")
        if self.attempt < 1 or self.gpus < 1:
            raise ValueError("attempt and gpus start at 1")
        if not 0.0 <= self.test_fraction <= MAX_TEST_FRACTION:
            raise ValueError(f"test_fraction must be in (0, {MAX_TEST_FRACTION}] or 0")
        if self.test_fraction and self.test_data is not None:
            raise ValueError("give test_data or test_fraction, not both")


def held_out_count(rows: int, fraction: float) -> int:
    """How many of `rows` training rows a `fraction` test split holds out: at least one
    (when asked for), and never all of them."""
    if fraction <= 0 or rows < 2:
        return 0
    return max(1, min(rows - 1, int(rows * fraction)))


def held_out_rows(rows: int, fraction: float, seed: int) -> frozenset[int]:
    """The 0-based indices (in file order, blank lines skipped) of the training rows held
    out for testing: a seeded sample, the same on every attempt, worker and control plane."""
    chooser = random.Random(seed)  # noqa: S311 - reproducible on purpose, not a secret
    return frozenset(chooser.sample(range(rows), held_out_count(rows, fraction)))


@dataclass(frozen=True)
class Report:
    """One message from a worker attempt. `(job_id, attempt, seq)` identifies it: the
    control plane applies each once, whatever the broker redelivers.

    `data` by kind:
    - started: {"total_steps", "resumed_from_step", "device", "world_size"}
    - progress: {"step", "total_steps", "epoch", "train_loss", "learning_rate",
      "tokens_per_second", "eta_seconds", "trained_tokens"}
    - metrics: {"step", "valid_loss", "valid_mean_token_accuracy" | "valid_accuracy", ...}
      (and once, at the end, the test metrics: {"step", "test_loss", ...})
    - checkpoint: {"step", "uri", "metrics": {...}}
    - succeeded: {"step", "trained_tokens", "artifact_uri", "artifact_files": [names],
      "artifact_kind": "full" | "lora", "metrics": {...}, "test_metrics": {...} | None}
      (test metrics: "test_loss" and "test_perplexity" | "test_accuracy" and
      "test_macro_f1" | "test_reward_accuracy", plus "test_rows")
    - paused: {"step", "checkpoint_uri"}
    - cancelled: {"step"}
    - failed: {"code", "message", "retryable": bool}
    - heartbeat: {"phase"}
    """

    job_id: str
    attempt: int
    seq: int
    kind: str
    at: float  # unix seconds, worker clock
    data: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Report:
        report = cls(**data)
        if report.kind not in REPORT_KINDS:
            raise ValueError(f"unknown report kind {report.kind!r}")
        return report


@dataclass(frozen=True)
class Signal:
    """What the control plane wants of a job right now, read by the worker from storage."""

    attempt: int
    action: str = RUN

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> Signal:
        data = json.loads(raw)
        signal = cls(attempt=int(data["attempt"]), action=str(data.get("action", RUN)))
        if signal.action not in SIGNAL_ACTIONS:
            raise ValueError(f"unknown signal action {signal.action!r}")
        return signal
