"""What a compression method is given, and how it reports its steps.

A method is `fn(work: Work) -> None`: it reads the source from `work.source_dir` (a local
Hugging Face directory, LoRA already merged), writes the result to `work.out_dir` as a
complete Hugging Face directory (config.json, *.safetensors, the tokenizer files and, for
an embedding model, the sentence-transformers files), and calls `work.step(...)` after
each training step, which may raise `Cancelled` or `StaleAttempt`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

#: step(step, total_steps, train_loss) -> None; raises Cancelled / StaleAttempt.
StepFn = Callable[[int, int, "float | None"], None]


class Cancelled(Exception):
    """The control plane asked the job to stop."""


class CompressionError(Exception):
    """What the user can fix (bad options for this model, unusable data): a failed report."""

    def __init__(self, code: str, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param


@dataclass
class Work:
    task: str  # causal_lm | embeddings | classification
    method: str  # quantize | prune | distill
    source_dir: Path
    out_dir: Path
    options: dict[str, Any]
    device: torch.device
    seed: int = 0
    #: Plain texts of the training rows (recovery / distillation); may be empty.
    train_texts: list[str] = field(default_factory=list)
    #: Label ids of `train_texts` for a classifier (same length), else empty.
    train_labels: list[int] = field(default_factory=list)
    #: distill onto a chosen smaller model of the same tokenizer: its local directory.
    student_dir: Path | None = None
    labels: tuple[str, ...] = ()
    step: StepFn = field(default=lambda step, total, loss: None)
    #: What the method wants the report to say (e.g. which heads it removed).
    notes: dict[str, Any] = field(default_factory=dict)
