"""An evaluation attempt scores base, LoRA fine-tuned and classifier models on one file and
writes one line of per-row results per input row."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from gpuworkers.compression import quantized
from gpuworkers.evaluation.runner import run_evaluation
from gpuworkers.training.engine import run_training
from jobcontracts.compression import SourceRef
from jobcontracts.evaluation import EvaluationSpec
from jobcontracts.training import CANCEL, DataRef, Signal
from tests.gpuworkers.helpers import (
    CLASSIFICATION_ROWS,
    TEXT_LINES,
    Reports,
    ScriptedSignals,
    assert_well_formed,
    base_model,
    final_dir,
    make_spec,
    write_jsonl,
    write_text,
)


def _spec(tmp: Path, models: list[SourceRef], uri: str, fmt: str, **kw: object) -> EvaluationSpec:
    return EvaluationSpec(
        job_id="evaljob-test",
        attempt=1,
        organization_id="org-test",
        task="classification" if fmt == "classification" else "causal_lm",
        models=tuple(models),
        data=DataRef(uri, fmt),
        output_uri=f"file://{tmp}/out",
        control_uri=f"file://{tmp}/control.json",
        batch_size=2,
        max_seq_len=64,
        control_poll_seconds=0.0,
        **kw,  # type: ignore[arg-type]
    )


def _results(tmp: Path) -> list[dict[str, object]]:
    lines = (tmp / "out" / "results.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def test_a_base_and_its_lora_fine_tune_side_by_side(tmp_path: Path) -> None:
    train = make_spec(tmp_path / "train", rows=TEXT_LINES, fmt="text", n_epochs=6)
    assert run_training(train, Reports()).status == "succeeded"
    base = base_model("llama")
    models = [
        SourceRef(name=base.name, uri=base.uri, family="llama"),
        SourceRef(
            name="ft:tiny", uri=base.uri, family="llama", adapter_uri=f"file://{final_dir(train)}"
        ),
    ]
    uri = write_text(tmp_path / "eval.txt", TEXT_LINES)
    reports = Reports()

    outcome = run_evaluation(_spec(tmp_path, models, uri, "text"), reports)

    assert outcome.status == "succeeded", reports.of("failed")
    assert_well_formed(reports, final="succeeded")
    done = reports.one("succeeded").data
    assert done["rows"] == 3
    assert done["artifact_uri"] == f"file://{tmp_path}/out/results.jsonl"
    table = done["metrics"]
    assert set(table) == {base.name, "ft:tiny"}
    # The fine-tune was trained on these very lines: it models them better than its base.
    assert table["ft:tiny"]["loss"] < table[base.name]["loss"]
    for metrics in table.values():
        assert metrics["perplexity"] == pytest.approx(math.exp(metrics["loss"]))
    assert done["tokens"][base.name] > 0

    rows = _results(tmp_path)
    assert [r["row"] for r in rows] == [0, 1, 2]
    # Each row's base-model loss is what the model itself computes for that line.
    folder = base.uri.removeprefix("file://")
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    for line, row in zip(TEXT_LINES, rows, strict=True):
        ids = tokenizer(line, return_tensors="pt")["input_ids"]
        if tokenizer.eos_token_id is not None:
            ids = torch.cat([ids, torch.tensor([[tokenizer.eos_token_id]])], dim=1)
        with torch.no_grad():
            expected = float(model(input_ids=ids, labels=ids).loss)
        result = row["results"][base.name]  # type: ignore[index]
        assert result["loss"] == pytest.approx(expected, rel=1e-4)


def test_a_classifier_is_scored_with_accuracy_and_macro_f1_per_row(tmp_path: Path) -> None:
    labels = ("negative", "positive")
    train = make_spec(
        tmp_path / "train",
        rows=CLASSIFICATION_ROWS,
        fmt="classification",
        task="classification",
        labels=labels,
        n_epochs=2,
        batch_size=4,
    )
    assert run_training(train, Reports()).status == "succeeded"
    base = base_model("llama")
    ref = SourceRef(
        "ft:cls", base.uri, "llama", adapter_uri=f"file://{final_dir(train)}", labels=labels
    )
    uri = write_jsonl(tmp_path / "eval.jsonl", CLASSIFICATION_ROWS)
    reports = Reports()

    outcome = run_evaluation(_spec(tmp_path, [ref], uri, "classification"), reports)

    assert outcome.status == "succeeded", reports.of("failed")
    metrics = reports.one("succeeded").data["metrics"]["ft:cls"]
    assert set(metrics) == {"loss", "accuracy", "macro_f1"}
    rows = _results(tmp_path)
    correct = [r["results"]["ft:cls"]["correct"] for r in rows]  # type: ignore[index]
    assert metrics["accuracy"] == pytest.approx(sum(correct) / len(rows))
    assert [r["results"]["ft:cls"]["label"] for r in rows] == [  # type: ignore[index]
        labels.index(str(row["label"])) for row in CLASSIFICATION_ROWS
    ]


def test_a_cancelled_evaluation_stops_and_writes_nothing(tmp_path: Path) -> None:
    base = base_model("llama")
    uri = write_text(tmp_path / "eval.txt", TEXT_LINES * 4)
    spec = _spec(tmp_path, [SourceRef(base.name, base.uri, "llama")], uri, "text")
    reports = Reports()

    outcome = run_evaluation(
        spec, reports, signal_reader=ScriptedSignals(None, None, Signal(1, CANCEL))
    )

    assert outcome.status == "cancelled"
    assert_well_formed(reports, final="cancelled")
    assert not (tmp_path / "out").exists()


def test_a_quantized_compressed_model_is_scored_next_to_its_source(tmp_path: Path) -> None:
    base = base_model("llama")
    folder = Path(base.uri.removeprefix("file://"))
    source = AutoModelForCausalLM.from_pretrained(folder).eval()
    int8 = tmp_path / "int8"
    quantized.save(source, int8, weights="int8", kind="causal")
    AutoTokenizer.from_pretrained(folder).save_pretrained(int8)
    models = [
        SourceRef(base.name, base.uri, "llama"),
        SourceRef("ft:tiny:int8", f"file://{int8}", "llama"),
    ]
    uri = write_text(tmp_path / "eval.txt", TEXT_LINES)
    reports = Reports()

    outcome = run_evaluation(_spec(tmp_path, models, uri, "text"), reports)

    assert outcome.status == "succeeded", reports.of("failed")
    table = reports.one("succeeded").data["metrics"]
    # Per-row int8 weights: the same tokens, nearly the same loss.
    assert table["ft:tiny:int8"]["tokens"] == table[base.name]["tokens"]
    assert table["ft:tiny:int8"]["loss"] == pytest.approx(table[base.name]["loss"], rel=0.05)
