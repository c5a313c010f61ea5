"""Prune and distill attempts report the tokens they trained on (`trained_tokens` of the
succeeded report), counted as fine-tuning counts them: the real (non-padding) tokens of
every batch. It is what a data partner whose rows they are is credited for, so rows that
are nobody's (the built-in calibration texts) count for nothing, and quantizing trains on
nothing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import AutoTokenizer

from gpuworkers.compression import runner
from tests.gpuworkers.helpers import Reports, assert_well_formed
from tests.gpuworkers.test_compression_prune import one_thread as one_thread
from tests.gpuworkers.test_compression_runner import make_spec
from tests.gpuworkers.test_compression_runner import quick_latency as quick_latency
from tests.gpuworkers.test_compression_runner import workroot as workroot
from tests.support.models import tiny_model_dir

#: 16 rows: 4 batches of 4 are one epoch.
ROWS = [
    f"{who} {did} the {what}"
    for who in ("my sister", "the driver", "a customer", "our team")
    for did, what in (("found", "red bicycle"), ("returned", "old invoice"))
    for _ in (0, 1)
]
ROWS = [f"{row} number {i}" for i, row in enumerate(ROWS)]


def tokens_of(rows: list[str]) -> int:
    """The rows' real tokens, as the worker tokenizes them (special tokens, 128 at most)."""
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir("llama")))
    encoded = tokenizer(rows, truncation=True, max_length=128)
    return sum(len(ids) for ids in encoded["input_ids"])


def attempt(tmp: Path, method: str, options: dict[str, Any], train: list[str] | None) -> Any:
    reports = Reports()
    spec = make_spec(tmp, method=method, options=options, train=train)
    outcome = runner.run_compression(spec, reports, signal_reader=lambda: None)
    assert outcome.status == "succeeded", reports.of("failed")
    assert_well_formed(reports, final="succeeded")
    data = reports.one("succeeded").data
    assert outcome.trained_tokens == data["trained_tokens"]
    return data


def test_prune_counts_the_rows_it_fit_the_channels_to_and_every_recovery_step(
    tmp_path: Path, quick_latency: None
) -> None:
    data = attempt(tmp_path, "prune", {"sparsity": 0.5, "recovery_steps": 8, "batch_size": 4}, ROWS)

    # The channel statistics read every row once; 8 steps of 4 rows are two epochs.
    assert data["trained_tokens"] == 3 * tokens_of(ROWS)
    notes = data["report"]["notes"]
    assert notes["channel_selection"]["calibration_tokens"] == tokens_of(ROWS)
    assert notes["recovery"]["tokens"] == 2 * tokens_of(ROWS)


def test_distill_counts_every_step_it_trained_on(tmp_path: Path, quick_latency: None) -> None:
    data = attempt(tmp_path, "distill", {"student_layers": 1, "steps": 4, "batch_size": 4}, ROWS)

    assert data["trained_tokens"] == tokens_of(ROWS)  # 4 steps of 4 rows: one epoch


def test_nothing_trained_on_is_nothing_reported(tmp_path: Path, quick_latency: None) -> None:
    # No training rows: the channels are chosen on the built-in texts, nobody's rows.
    pruned = attempt(tmp_path / "prune", "prune", {"sparsity": 0.5}, None)
    quantized = attempt(tmp_path / "quantize", "quantize", {"weights": "int8"}, None)

    assert pruned["trained_tokens"] == 0
    assert pruned["report"]["notes"]["channel_selection"]["calibration_tokens"] > 0
    assert quantized["trained_tokens"] == 0
