"""Each data format and method trains, reports and leaves a loadable artifact."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
)

from gpuworkers.training.engine import run_training
from jobcontracts.training import TrainingSpec
from tests.gpuworkers.helpers import (
    CHAT_ROWS,
    CLASSIFICATION_ROWS,
    PREFERENCE_ROWS,
    PROMPT_COMPLETION_ROWS,
    TEXT_LINES,
    Reports,
    assert_no_pickle,
    assert_well_formed,
    final_dir,
    make_spec,
)

LABELS = ("negative", "positive")


def _lm_loss(model: torch.nn.Module, tokenizer: object, texts: list[str]) -> float:
    model.eval()
    losses = []
    with torch.no_grad():
        for text in texts:
            ids = tokenizer(text, return_tensors="pt")["input_ids"]  # type: ignore[operator]
            losses.append(float(model(input_ids=ids, labels=ids).loss))
    return sum(losses) / len(losses)


def _base_dir(spec: TrainingSpec) -> Path:
    return Path(spec.base_model.uri.removeprefix("file://"))


def test_lora_chat_sft_learns_and_leaves_a_peft_adapter(tmp_path: Path) -> None:
    spec = make_spec(
        tmp_path, n_epochs=8, batch_size=3, learning_rate=3e-2, valid_rows=CHAT_ROWS, seed=3
    )
    reports = Reports()

    outcome = run_training(spec, reports)

    assert outcome.status == "succeeded"
    assert_well_formed(reports, final="succeeded")
    assert reports.kinds()[0] == "started"
    started = reports.one("started").data
    assert started == {"total_steps": 8, "resumed_from_step": 0, "device": "cpu", "world_size": 1}
    # Evaluated on the same rows once per epoch: the loss goes down, epoch after epoch.
    valid = [r.data["valid_loss"] for r in reports.of("metrics")]
    assert len(valid) == 8
    assert valid[-1] < valid[0] - 0.05
    assert all(0.0 <= r.data["valid_mean_token_accuracy"] <= 1.0 for r in reports.of("metrics"))
    done = reports.one("succeeded").data
    assert done["step"] == 8
    assert done["artifact_kind"] == "lora"
    assert done["artifact_uri"] == spec.output_uri + "/final"
    assert {"adapter_model.safetensors", "adapter_config.json", "atelier.json"} <= set(
        done["artifact_files"]
    )
    assert done["metrics"]["valid_loss"] == valid[-1]

    final = final_dir(spec)
    assert sorted(done["artifact_files"]) == assert_no_pickle(final)
    manifest = json.loads((final / "atelier.json").read_text())
    assert manifest == {
        "task": "causal_lm",
        "method": "supervised",
        "artifact_kind": "lora",
        "base_model": "tiny-llama",
        "family": "llama",
        "labels": [],
        "job_id": "ftjob-test",
    }
    assert json.loads((final / "adapter_config.json").read_text())["target_modules"] in (
        ["q_proj", "v_proj"],
        ["v_proj", "q_proj"],
    )
    # Plain PEFT loading on the untouched base: the adapter holds what was learned.
    tokenizer = AutoTokenizer.from_pretrained(final)
    texts = [tokenizer.apply_chat_template(row["messages"], tokenize=False) for row in CHAT_ROWS]
    base = AutoModelForCausalLM.from_pretrained(_base_dir(spec))
    base_loss = _lm_loss(base, tokenizer, texts)
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(_base_dir(spec)), final)
    assert _lm_loss(tuned, tokenizer, texts) < base_loss - 0.1


def test_full_fine_tune_of_gpt2_on_prompt_completion_saves_a_whole_model(tmp_path: Path) -> None:
    spec = make_spec(
        tmp_path,
        rows=PROMPT_COMPLETION_ROWS,
        fmt="prompt_completion",
        family="gpt2",
        adapter=None,
        repeat=4,
        n_epochs=3,
        batch_size=4,
        learning_rate=3e-3,
    )
    reports = Reports()

    outcome = run_training(spec, reports)

    assert outcome.status == "succeeded", reports.of("failed")
    assert_well_formed(reports, final="succeeded")
    progress = reports.of("progress")
    assert progress[0].data["step"] == 1
    assert progress[-1].data["step"] == 9
    assert progress[-1].data["train_loss"] < progress[0].data["train_loss"] - 0.5
    assert progress[-1].data["eta_seconds"] == 0
    assert all(r.data["tokens_per_second"] > 0 for r in progress)
    done = reports.one("succeeded").data
    assert done["artifact_kind"] == "full"
    final = final_dir(spec)
    files = assert_no_pickle(final)
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json"} <= set(
        files
    )
    tuned = AutoModelForCausalLM.from_pretrained(final)
    tokenizer = AutoTokenizer.from_pretrained(final)
    base = AutoModelForCausalLM.from_pretrained(_base_dir(spec))
    texts = [row["prompt"] + row["completion"] for row in PROMPT_COMPLETION_ROWS]
    assert _lm_loss(tuned, tokenizer, texts) < _lm_loss(base, tokenizer, texts) - 0.5


def test_text_format_learns_every_token_and_counts_them(tmp_path: Path) -> None:
    spec = make_spec(tmp_path, rows=TEXT_LINES, fmt="text", family="gpt2", n_epochs=2, batch_size=2)
    reports = Reports()

    outcome = run_training(spec, reports)

    assert outcome.status == "succeeded"
    tokenizer = AutoTokenizer.from_pretrained(_base_dir(spec))
    # Every line's tokens plus its end-of-text token, once per epoch: nothing is padding.
    per_epoch = sum(len(tokenizer(line)["input_ids"]) + 1 for line in TEXT_LINES)
    assert outcome.trained_tokens == 2 * per_epoch
    assert reports.one("succeeded").data["trained_tokens"] == 2 * per_epoch
    assert reports.of("progress")[-1].data["trained_tokens"] == 2 * per_epoch
    config = json.loads((final_dir(spec) / "adapter_config.json").read_text())
    assert config["target_modules"] == ["c_attn"]
    assert config["base_model_name_or_path"] == "tiny-gpt2"


def test_minilm_classification_reports_validation_accuracy(tmp_path: Path) -> None:
    spec = make_spec(
        tmp_path,
        rows=CLASSIFICATION_ROWS,
        fmt="classification",
        family="bert",
        task="classification",
        adapter=None,
        labels=LABELS,
        valid_rows=CLASSIFICATION_ROWS,
        n_epochs=3,
        batch_size=4,
        learning_rate=1e-4,
    )
    reports = Reports()

    outcome = run_training(spec, reports)

    assert outcome.status == "succeeded", reports.of("failed")
    metrics = reports.of("metrics")
    assert [m.data["step"] for m in metrics] == [2, 4, 6]  # once per epoch
    assert metrics[-1].data["valid_accuracy"] >= 0.75
    assert metrics[-1].data["valid_loss"] < metrics[0].data["valid_loss"]
    final = final_dir(spec)
    assert_no_pickle(final)
    model = AutoModelForSequenceClassification.from_pretrained(final)
    assert model.config.id2label == {0: "negative", 1: "positive"}
    tokenizer = AutoTokenizer.from_pretrained(final)
    batch = tokenizer([r["text"] for r in CLASSIFICATION_ROWS], padding=True, return_tensors="pt")
    with torch.no_grad():
        predicted = model(**batch).logits.argmax(-1).tolist()
    expected = [LABELS.index(r["label"]) for r in CLASSIFICATION_ROWS]
    assert sum(p == e for p, e in zip(predicted, expected, strict=True)) >= 6
    assert json.loads((final / "atelier.json").read_text())["labels"] == list(LABELS)


def test_lora_classification_on_a_causal_lm_saves_its_new_head(tmp_path: Path) -> None:
    spec = make_spec(
        tmp_path,
        rows=CLASSIFICATION_ROWS,
        fmt="classification",
        family="llama",
        task="classification",
        labels=LABELS,
        valid_rows=CLASSIFICATION_ROWS,
        n_epochs=3,
        batch_size=4,
    )
    reports = Reports()

    outcome = run_training(spec, reports)

    assert outcome.status == "succeeded", reports.of("failed")
    assert "valid_accuracy" in reports.of("metrics")[-1].data
    final = final_dir(spec)
    weights = load_file(final / "adapter_model.safetensors")
    assert any("score" in name for name in weights), sorted(weights)
    base = AutoModelForSequenceClassification.from_pretrained(_base_dir(spec), num_labels=2)
    base.config.pad_token_id = AutoTokenizer.from_pretrained(final).pad_token_id
    tuned = PeftModel.from_pretrained(base, final)
    assert tuned(input_ids=torch.tensor([[5, 6, 7]])).logits.shape == (1, 2)


def test_dpo_with_lora_starts_at_log_2_and_prefers_the_chosen_answers(tmp_path: Path) -> None:
    spec = make_spec(
        tmp_path,
        rows=PREFERENCE_ROWS,
        fmt="preference",
        method="dpo",
        repeat=2,
        n_epochs=3,
        batch_size=4,
        learning_rate=2e-2,
        valid_rows=PREFERENCE_ROWS,
    )
    reports = Reports()

    outcome = run_training(spec, reports)

    assert outcome.status == "succeeded", reports.of("failed")
    progress = reports.of("progress")
    # Step 1: the policy is the reference, so every pair's loss is -logsigmoid(0) = log 2.
    assert progress[0].data["train_loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert progress[-1].data["train_loss"] < math.log(2) - 0.03
    last = reports.of("metrics")[-1].data
    assert last["valid_loss"] < math.log(2)
    assert last["valid_reward_accuracy"] >= 0.75
    assert reports.one("succeeded").data["artifact_kind"] == "lora"


def test_dpo_full_fine_tune_uses_a_frozen_copy_of_the_base(tmp_path: Path) -> None:
    spec = make_spec(
        tmp_path,
        rows=PREFERENCE_ROWS,
        fmt="preference",
        method="dpo",
        family="llama",
        adapter=None,
        n_epochs=2,
        batch_size=2,
        learning_rate=1e-3,
    )
    reports = Reports()

    outcome = run_training(spec, reports)

    assert outcome.status == "succeeded", reports.of("failed")
    progress = reports.of("progress")
    assert progress[0].data["train_loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert progress[-1].data["train_loss"] < math.log(2)
    assert "model.safetensors" in assert_no_pickle(final_dir(spec))


def test_long_rows_are_truncated_to_max_seq_len_never_refused(tmp_path: Path) -> None:
    long_prompt = " ".join(["one two three four five"] * 40)
    rows = [{"prompt": long_prompt, "completion": " six seven eight"}] * 2
    spec = make_spec(
        tmp_path, rows=rows, fmt="prompt_completion", family="gpt2", max_seq_len=16, n_epochs=1
    )
    reports = Reports()

    outcome = run_training(spec, reports)

    assert outcome.status == "succeeded", reports.of("failed")
    assert outcome.trained_tokens == 2 * 16
