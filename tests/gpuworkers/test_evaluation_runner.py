"""An evaluation attempt scores base, LoRA fine-tuned, classifier and embedding models on one
file and writes one line of per-row results per input row."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

from gpuworkers import retrieval
from gpuworkers.compression import measure, quantized
from gpuworkers.compression.context import Work
from gpuworkers.compression.quantize import quantize
from gpuworkers.evaluation.runner import own_key_ranks, run_evaluation
from gpuworkers.training.engine import run_training
from jobcontracts import evaluation as contract
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
from tests.support.models import minilm_dir
from tests.support.pairs import PAIRS


def _spec(tmp: Path, models: list[SourceRef], uri: str, fmt: str, **kw: object) -> EvaluationSpec:
    return EvaluationSpec(
        job_id="evaljob-test",
        attempt=1,
        organization_id="org-test",
        task={"classification": "classification", "pairs": "embeddings"}.get(fmt, "causal_lm"),
        models=tuple(models),
        data=DataRef(uri, fmt),
        output_uri=f"file://{tmp}/out",
        control_uri=f"file://{tmp}/control.json",
        **{"batch_size": 2, "max_seq_len": 64, "control_poll_seconds": 0.0, **kw},  # type: ignore[arg-type]
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


# --- embedding models on pairs -------------------------------------------------------------


def _mean_pooled(texts: list[str]) -> torch.Tensor:
    """MiniLM's sentence embeddings as sentence-transformers makes them (mean pooling over
    the attention mask, L2-normalised), computed here from the model directly."""
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    model = AutoModel.from_pretrained(minilm_dir()).eval()
    batch = tokenizer(texts, padding=True, truncation=True, max_length=512, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    return F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


def test_minilm_and_its_int8_copy_are_scored_on_pairs_side_by_side(tmp_path: Path) -> None:
    int8 = tmp_path / "int8"
    quantize(
        Work(
            task="embeddings",
            method="quantize",
            source_dir=minilm_dir(),
            out_dir=int8,
            options={"weights": "int8"},
            device=torch.device("cpu"),
            labels=(),
        )
    )
    models = [
        SourceRef("all-MiniLM-L6-v2", minilm_dir().as_uri(), "bert"),
        SourceRef("ft:minilm:int8", int8.as_uri(), "bert"),
    ]
    uri = write_jsonl(tmp_path / "pairs.jsonl", [{"query": q, "positive": p} for q, p in PAIRS])
    reports = Reports()

    outcome = run_evaluation(_spec(tmp_path, models, uri, "pairs", batch_size=5), reports)

    assert outcome.status == "succeeded", reports.of("failed")
    assert_well_formed(reports, final="succeeded")
    done = reports.one("succeeded").data
    assert done["rows"] == len(PAIRS)
    assert reports.one("started").data["total_steps"] == 2 * 3  # 12 rows in batches of 5
    table = done["metrics"]
    base, small = table["all-MiniLM-L6-v2"], table["ft:minilm:int8"]
    assert set(base) == {"mean_cosine", "recall_at_1", "recall_at_5", "recall_at_10"}

    # Against the embeddings computed here: the same cosines, the same recall.
    queries = _mean_pooled([q for q, _ in PAIRS])
    positives = _mean_pooled([p for _, p in PAIRS])
    cosines = (queries * positives).sum(-1)
    assert base["mean_cosine"] == pytest.approx(float(cosines.mean()), abs=1e-4)
    assert base == {
        "mean_cosine": base["mean_cosine"],
        **{f"recall_at_{k}": v for k, v in retrieval.recall_at_k(queries, positives).items()},
    }
    assert base["recall_at_1"] >= 0.75
    assert base["recall_at_10"] == 1.0
    # int8 weights embed nearly as the original does.
    assert small["mean_cosine"] == pytest.approx(base["mean_cosine"], abs=0.03)
    assert small["recall_at_5"] >= base["recall_at_5"] - 1 / len(PAIRS)

    rows = _results(tmp_path)
    assert [r["row"] for r in rows] == list(range(len(PAIRS)))
    for row, cosine in zip(rows, cosines.tolist(), strict=True):
        result = row["results"]["all-MiniLM-L6-v2"]  # type: ignore[index]
        assert result["cosine"] == pytest.approx(cosine, abs=1e-4)
        assert result["rank"] >= 1
    # Tokens read: every query and positive, [CLS] and [SEP] included.
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    texts = [t for pair in PAIRS for t in pair]
    expected = sum(len(ids) for ids in tokenizer(texts)["input_ids"])
    assert done["tokens"] == {"all-MiniLM-L6-v2": expected, "ft:minilm:int8": expected}


def test_own_key_ranks_in_blocks_agree_with_recall_at_k_ties_included() -> None:
    torch.manual_seed(0)
    queries = F.normalize(torch.randn(37, 8), dim=-1)
    keys = F.normalize(torch.randn(37, 8), dim=-1)
    keys[5] = keys[3]  # a tie: the lower row ranks first
    queries[3] = keys[3]
    queries[5] = keys[3]

    ranks = own_key_ranks(queries, keys, block=4)

    assert ranks[3] == 0
    assert ranks[5] == 1  # key 3 scores as high and has the lower index
    assert ranks == own_key_ranks(queries, keys)  # one block or many: the same
    ks = (1, 2, 5, 10, 37)
    expected = retrieval.recall_at_k(queries, keys, ks)
    assert {k: round(sum(r < k for r in ranks) / 37, 6) for k in ks} == expected


def test_the_embedding_token_limit_is_the_one_the_worker_embeds_with() -> None:
    assert contract.EMBED_MAX_TOKENS == measure.MAX_QUALITY_TOKENS
    assert contract.RECALL_KS == retrieval.DEFAULT_KS


@pytest.mark.parametrize(
    ("task", "fmt"), [("causal_lm", "pairs"), ("embeddings", "chat"), ("embeddings", "text")]
)
def test_pairs_go_with_embedding_models_only(tmp_path: Path, task: str, fmt: str) -> None:
    spec = _spec(tmp_path, [SourceRef("m", "file:///m", "bert")], "file:///d", fmt)
    bad = {**spec.to_json(), "task": task}
    with pytest.raises(ValueError, match="pairs are scored on embedding models"):
        EvaluationSpec.from_json(bad)


def test_a_malformed_pairs_file_fails_the_attempt_naming_the_line(tmp_path: Path) -> None:
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"query": "a", "positive": "b"}\n\n{"query": "c"}\n')
    spec = _spec(tmp_path, [SourceRef("m", minilm_dir().as_uri(), "bert")], path.as_uri(), "pairs")
    reports = Reports()

    outcome = run_evaluation(spec, reports)

    assert outcome.status == "failed"
    failed = reports.one("failed").data
    assert failed["code"] == "invalid_file"
    assert "line 3" in failed["message"]
