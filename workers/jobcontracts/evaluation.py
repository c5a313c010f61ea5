"""The evaluation contract: what the control plane sends a GPU worker to score models on a file.

The control plane sends `EvaluationSpec.to_json()` as the only argument of the task
`queues.EVALUATE` on queue `gpu.training` (the `gpu` workers' long-job queue). The worker
reports exactly as a fine-tuning attempt does (`jobcontracts.training.Report`, task
`queues.CONTROL_JOB_REPORT`): the same `(job_id, attempt, seq)` identity, lease, heartbeats
and storage `Signal` (cancel, fencing). An evaluation has no checkpoints: a lost attempt
starts again.

Report `data` of an evaluation attempt, by kind:
- started: {"device", "models", "rows", "total_steps"}  (a step = one model on one batch)
- progress: {"step", "total_steps", "model"}
- heartbeat: {"phase"}  (loading, scoring, uploading)
- succeeded: {"artifact_uri": the per-row results file, "artifact_files": [name],
  "rows", "metrics": {model name: Metrics}, "tokens": {model name: tokens read}}
- cancelled: {"step"}
- failed: {"code", "message", "retryable": bool, "param"?}

Metrics by the file's format: language modelling ("chat", "prompt_completion", "text"):
{"loss", "perplexity", "mean_token_accuracy", "tokens"}; "classification": {"loss",
"accuracy", "macro_f1"}; "preference": {"preference_accuracy", "mean_margin"};
"pairs" (embedding models): {"mean_cosine", "recall_at_1", "recall_at_5", "recall_at_10"}
(`gpuworkers.retrieval`: each query's cosine to its own positive, and whether its own
positive is among its k nearest of all the file's positives).

The results file (JSON Lines, one line per row of the input): {"row": 0-based index,
"results": {model name: {"loss", "tokens"} | {"label", "predicted", "correct"} |
{"chosen_logp", "rejected_logp", "correct"} | {"cosine", "rank"}}}; a pair's `rank` is
1 when its own positive is the query's nearest (ties go to the lower row, as in
`retrieval.recall_at_k`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Final

from jobcontracts.compression import SourceRef
from jobcontracts.training import DATA_FORMATS, DataRef

#: File formats scored as language modelling (per learned token).
LM_FORMATS: Final = ("chat", "prompt_completion", "text")
#: Query/positive rows (the Files API's "pairs" format), scored on embedding models only:
#: fine-tuning does not read them (it trains no embedding model).
PAIRS_FORMAT: Final = "pairs"
#: What an evaluation scores: every format training reads, and pairs.
FORMATS: Final = (*DATA_FORMATS, PAIRS_FORMAT)
#: The model kind each is scored on ("causal_lm" for LM and preference files).
TASKS: Final = ("causal_lm", "classification", "embeddings")
#: The k's of recall@k reported for pairs (as `gpuworkers.retrieval.DEFAULT_KS`).
RECALL_KS: Final = (1, 5, 10)
#: Tokens of each text an embedding model reads, at most (the encoders' usual limit, and
#: `gpuworkers.compression.measure.MAX_QUALITY_TOKENS`, which embeds them): what the
#: control plane's estimate caps each query and positive at.
EMBED_MAX_TOKENS: Final = 512
#: Where the results are written, under `output_uri`.
RESULTS_FILE: Final = "results.jsonl"
MAX_MODELS: Final = 8


@dataclass(frozen=True)
class EvaluationSpec:
    job_id: str
    attempt: int
    organization_id: str
    #: What the models are: "causal_lm" (LM and preference files), "classification" or
    #: "embeddings" (pairs files).
    task: str
    #: The models to score, in the order of the side-by-side table.
    models: tuple[SourceRef, ...]
    data: DataRef
    #: Results go to `{output_uri}/results.jsonl`.
    output_uri: str
    control_uri: str
    batch_size: int = 8
    max_seq_len: int = 512
    heartbeat_seconds: float = 10.0
    control_poll_seconds: float = 1.0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> EvaluationSpec:
        data = dict(data)
        data["models"] = tuple(
            SourceRef(**{**m, "labels": tuple(m.get("labels") or ())}) for m in data["models"]
        )
        data["data"] = DataRef(**data["data"])
        spec = cls(**data)
        spec.check()
        return spec

    def check(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}")
        if self.data.format not in FORMATS:
            raise ValueError(f"unknown data format {self.data.format!r}")
        if (self.task == "classification") != (self.data.format == "classification"):
            raise ValueError("classification data is scored on classifiers, and only there")
        if (self.task == "embeddings") != (self.data.format == PAIRS_FORMAT):
            raise ValueError("pairs are scored on embedding models, and only there")
        if not 1 <= len(self.models) <= MAX_MODELS:
            raise ValueError(f"give 1 to {MAX_MODELS} models")
        if len({m.name for m in self.models}) != len(self.models):
            raise ValueError("each model once")
        if self.attempt < 1 or self.batch_size < 1 or self.max_seq_len < 2:
            raise ValueError("attempt, batch_size and max_seq_len must be positive")
