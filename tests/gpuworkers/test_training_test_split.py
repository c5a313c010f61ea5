"""Held-out test data: a `test_fraction` split of the training file never reaches training,
and the final model is scored on the test rows (or a `test_data` file) at the end."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoTokenizer

from gpuworkers.training import data, objectives
from gpuworkers.training.engine import run_training
from jobcontracts.training import DataRef, held_out_count, held_out_rows
from tests.gpuworkers.helpers import (
    CLASSIFICATION_ROWS,
    PREFERENCE_ROWS,
    Reports,
    assert_well_formed,
    make_spec,
    write_jsonl,
)

WORDS = ("cat", "sat", "mat", "one", "two", "three", "four", "five", "six", "seven", "eight")
#: Twenty distinct texts, so each row's tokens identify it.
ROWS = [f"the {WORDS[i % 11]} {WORDS[(i * 7) % 11]} on the mat {i}" for i in range(20)]


class Spy:
    """Records, for every batch the engine computes a loss on, whether the model was
    training and the rows' token ids (padding dropped); then runs the real objective."""

    def __init__(self) -> None:
        self.trained: set[tuple[int, ...]] = set()
        self.evaluated: set[tuple[int, ...]] = set()
        self.real = objectives.compute

    def __call__(self, kind: str, model: Any, batch: dict[str, torch.Tensor], **kw: Any) -> Any:
        into = self.trained if model.training else self.evaluated
        for ids, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True):
            into.add(tuple(int(t) for t in ids[mask.bool()]))
        return self.real(kind, model, batch, **kw)


def _row_ids(spec: Any, path: Path) -> list[tuple[int, ...]]:
    """Each row's token ids as the engine makes them, tokenized here independently."""
    tokenizer = AutoTokenizer.from_pretrained(spec.base_model.uri.removeprefix("file://"))
    rows = data.load(path, fmt="text", tokenizer=tokenizer, labels=(), max_len=64)
    return [tuple(rows.ids[rows.starts[i] : rows.starts[i + 1]]) for i in range(len(rows))]


def test_rows_held_out_by_test_fraction_never_reach_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = make_spec(
        tmp_path, rows=ROWS, fmt="text", n_epochs=2, batch_size=4, seed=11, test_fraction=0.25
    )
    spy = Spy()
    monkeypatch.setattr(objectives, "compute", spy)
    reports = Reports()

    outcome = run_training(spec, reports)

    assert outcome.status == "succeeded", reports.of("failed")
    assert_well_formed(reports, final="succeeded")
    rows = _row_ids(spec, tmp_path / "data" / "train.jsonl")
    assert len(set(rows)) == len(ROWS)
    held = held_out_rows(len(ROWS), 0.25, seed=11)
    assert len(held) == held_out_count(len(ROWS), 0.25) == 5
    test_ids = {rows[i] for i in held}
    train_ids = {rows[i] for i in range(len(ROWS)) if i not in held}
    assert spy.trained == train_ids  # every other row, and no held-out one, trained on
    assert not spy.trained & test_ids
    assert spy.evaluated == test_ids  # scored on exactly the held-out rows
    # Two epochs over 15 rows in batches of 4: the test rows shrank the epoch.
    assert reports.one("started").data["total_steps"] == 2 * 4

    test = reports.one("succeeded").data["test_metrics"]
    assert test["test_rows"] == 5
    assert test["test_perplexity"] == pytest.approx(math.exp(test["test_loss"]))
    assert 0.0 <= test["test_mean_token_accuracy"] <= 1.0
    assert reports.of("metrics")[-1].data == {"step": 8, **test}


def test_the_same_seed_holds_out_the_same_rows_and_another_seed_others() -> None:
    assert held_out_rows(100, 0.1, 3) == held_out_rows(100, 0.1, 3)
    assert held_out_rows(100, 0.1, 3) != held_out_rows(100, 0.1, 4)
    assert held_out_count(2, 0.5) == 1
    assert held_out_count(3, 0.01) == 1
    assert held_out_count(1, 0.5) == 0  # nothing left to train on: refused


def test_a_test_file_scores_classification_with_accuracy_and_macro_f1(tmp_path: Path) -> None:
    test_uri = write_jsonl(tmp_path / "data" / "test.jsonl", CLASSIFICATION_ROWS[:6])
    spec = make_spec(
        tmp_path,
        rows=CLASSIFICATION_ROWS,
        fmt="classification",
        task="classification",
        labels=("negative", "positive"),
        valid_rows=CLASSIFICATION_ROWS[2:],
        n_epochs=1,
        batch_size=4,
        test_data=DataRef(test_uri, "classification"),
    )
    reports = Reports()

    outcome = run_training(spec, reports)

    assert outcome.status == "succeeded", reports.of("failed")
    final = reports.one("succeeded").data
    test = final["test_metrics"]
    assert set(test) == {"test_loss", "test_accuracy", "test_macro_f1", "test_rows"}
    assert test["test_rows"] == 6
    assert 0.0 <= test["test_macro_f1"] <= 1.0
    # Validation metrics stay alongside, computed the same way.
    assert {"valid_loss", "valid_accuracy", "valid_macro_f1"} <= set(final["metrics"])


def test_macro_f1_averages_each_class_f1() -> None:
    predicted = torch.tensor([0, 0, 1, 1, 2, 0])
    labels = torch.tensor([0, 1, 1, 1, 2, 2])
    counts = objectives.confusion_counts(predicted, labels, 4)  # class 3 never occurs
    # class 0: tp 1 fp 2 fn 0 → 0.5; class 1: tp 2 fp 0 fn 1 → 0.8; class 2: tp 1 fn 1 → 2/3
    assert objectives.macro_f1(counts) == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)


def test_dpo_reports_preference_accuracy_on_the_test_rows(tmp_path: Path) -> None:
    spec = make_spec(
        tmp_path,
        rows=PREFERENCE_ROWS,
        fmt="preference",
        method="dpo",
        repeat=2,
        n_epochs=1,
        batch_size=4,
        test_fraction=0.5,
    )
    reports = Reports()

    outcome = run_training(spec, reports)

    assert outcome.status == "succeeded", reports.of("failed")
    test = reports.one("succeeded").data["test_metrics"]
    assert test["test_rows"] == 4
    assert 0.0 <= test["test_reward_accuracy"] <= 1.0
    assert reports.one("started").data["total_steps"] == 1  # 4 pairs left, one batch


def test_a_test_file_in_another_format_fails_the_attempt(tmp_path: Path) -> None:
    test_uri = write_jsonl(tmp_path / "data" / "test.jsonl", CLASSIFICATION_ROWS)
    spec = make_spec(tmp_path, n_epochs=1, test_data=DataRef(test_uri, "classification"))
    reports = Reports()

    outcome = run_training(spec, reports)

    assert outcome.status == "failed"
    assert reports.one("failed").data["code"] == "invalid_spec"
    assert "test data" in reports.one("failed").data["message"]
