"""The compression contract: what the control plane sends a GPU worker to shrink a model.

The control plane sends `CompressionSpec.to_json()` as the only argument of the task
`queues.COMPRESS` on queue `gpu.compression`. The worker reports exactly as a
fine-tuning attempt does (`jobcontracts.training.Report`, task
`queues.CONTROL_JOB_REPORT`): the same `(job_id, attempt, seq)` identity, the same
lease renewed by heartbeats and progress, the same storage `Signal` for cancel and
fencing. A compression attempt has no checkpoints: a lost attempt starts again.

Report `data` of a compression attempt, by kind:
- started: {"device", "method", "total_steps"}
- progress: {"step", "total_steps", "phase", "train_loss"}  (recovery / distillation steps)
- heartbeat: {"phase"}  (loading, compressing, measuring, uploading)
- succeeded: {"artifact_uri", "artifact_files": [names], "artifact_kind": "full",
  "trained_tokens", "report": CompressionReport, "test_metrics": {...} | None}
  (test_metrics: the result's `test_…` measures below, plus "test_rows"; None without
  test data)
- cancelled: {"step"}
- failed: {"code", "message", "retryable": bool, "param"?}

A CompressionReport (JSON) holds, for the source and the result, measured on the same
worker in the same run: {"source": Measures, "result": Measures, "method", "device",
"quality_metric": "perplexity" | "accuracy" | "cosine_to_source", "options": {...}}
where Measures = {"parameters", "file_bytes", "peak_memory_bytes",
"latency_ms_p50_batch1", "latency_ms_p50_batch16", "quality"} (plus "f1" for a
classifier).

Held-out test data (`test_data`, or `test_fraction` of the training rows: the rows
`training.held_out_rows(rows, test_fraction, seed)` names, which never reach the method)
adds, to both Measures, the model's scores on the test rows:
- causal_lm: "test_loss" (mean next-token loss, nats) and "test_perplexity" (its exp);
- classification: "test_accuracy" and "test_macro_f1";
- embeddings: "test_cosine_to_source" (mean cosine of each test text's embedding to the
  source's) and "test_recall_at_1" / "_5" / "_10" (how often the source's embedding of the
  same text is among the k nearest of the source's embeddings of all test texts); None
  where the result embeds in another width than the source;
and to the report {"test_data": "test_file" | "test_fraction", "test_rows"}.

The artifact is a Hugging Face-format directory of safetensors + JSON only. A quantized
one also holds `QUANTIZATION_FILE`, naming which tensors are quantized and how; the
inference workers load it from that file alone.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Final

from jobcontracts.training import MAX_TEST_FRACTION, DataRef

METHODS: Final = ("quantize", "prune", "distill")
#: What a source model does; the result does the same.
TASKS: Final = ("causal_lm", "embeddings", "classification")
#: Weight formats of `quantize`: int8 runs everywhere; bf16 and fp8 need a CUDA worker.
QUANTIZE_WEIGHTS: Final = ("int8", "bf16", "fp8")
#: Structures `prune` removes.
PRUNE_TARGETS: Final = ("heads_and_channels", "layers")

#: The file in a quantized artifact that describes its quantized tensors.
QUANTIZATION_FILE: Final = "atelier_quantization.json"


@dataclass(frozen=True)
class SourceRef:
    """The model to compress, as a worker loads it."""

    name: str
    #: A Hugging Face-format directory (a base model, or a full fine-tune's own weights).
    uri: str
    family: str
    #: A LoRA adapter on `uri`, merged into it before compressing; None for full weights.
    adapter_uri: str | None = None
    #: Classification label names, index = class id.
    labels: tuple[str, ...] = ()


@dataclass(frozen=True)
class CompressionSpec:
    job_id: str
    attempt: int
    organization_id: str
    task: str  # one of TASKS
    method: str  # one of METHODS
    source: SourceRef
    #: The method's resolved options (see controlplane.jobs.compression for each).
    options: dict[str, Any]
    #: Where the result is written: `{output_uri}/final/…`.
    output_uri: str
    control_uri: str
    seed: int = 0
    #: Recovery (prune) or distillation rows.
    training_data: DataRef | None = None
    #: Rows the quality of the source and the result is measured on.
    validation_data: DataRef | None = None
    #: distill with a chosen smaller model: that model's directory (same tokenizer).
    student: SourceRef | None = None
    #: Held-out test rows the source and the result are scored on at the end (never
    #: trained on), in the training data's format.
    test_data: DataRef | None = None
    #: Or: hold out this fraction of the training rows as the test set (0 = none); which
    #: rows is `training.held_out_rows(rows, test_fraction, seed)`.
    test_fraction: float = 0.0
    heartbeat_seconds: float = 10.0
    control_poll_seconds: float = 1.0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CompressionSpec:
        data = dict(data)
        data["source"] = _source(data["source"])
        if data.get("student") is not None:
            data["student"] = _source(data["student"])
        for name in ("training_data", "validation_data", "test_data"):
            if data.get(name) is not None:
                data[name] = DataRef(**data[name])
        data["options"] = dict(data.get("options") or {})
        spec = cls(**data)
        spec.check()
        return spec

    def check(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}")
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}")
        if self.attempt < 1:
            raise ValueError("attempt starts at 1")
        if self.task == "classification" and len(self.source.labels) < 2:
            raise ValueError("a classifier needs at least two labels")
        if not 0.0 <= self.test_fraction <= MAX_TEST_FRACTION:
            raise ValueError(f"test_fraction must be in (0, {MAX_TEST_FRACTION}] or 0")
        if self.test_fraction and self.test_data is not None:
            raise ValueError("give test_data or test_fraction, not both")
        if self.test_fraction and self.training_data is None:
            raise ValueError("test_fraction holds out training rows: it needs training_data")


def _source(data: dict[str, Any]) -> SourceRef:
    data = dict(data)
    data["labels"] = tuple(data.get("labels") or ())
    return SourceRef(**data)
