"""Packing causal-LM rows: no attention across rows, the same loss and gradients."""

from __future__ import annotations

import json
import random
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, TaskType, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from gpuworkers.training import data, objectives
from gpuworkers.training.engine import run_training
from tests.gpuworkers.helpers import Reports, make_spec
from tests.support.models import tiny_model_dir

WORDS = "the cat sat on a mat and then it ran to the door hello how can i help"


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return AutoTokenizer.from_pretrained(tiny_model_dir("llama"))


def _rows(count: int, seed: int = 4) -> list[dict[str, str]]:
    r = random.Random(seed)
    words = WORDS.split()

    def text(n: int) -> str:
        return " ".join(r.choice(words) for _ in range(n))

    return [
        {"prompt": text(r.randint(1, 12)), "completion": " " + text(r.randint(1, 20))}
        for _ in range(count)
    ]


def _dataset(tmp_path: Path, tokenizer: Any, count: int = 7) -> data.TokenizedSet:
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in _rows(count)))
    return data.load(path, fmt="prompt_completion", tokenizer=tokenizer, labels=(), max_len=64)


def _model(attention: str) -> Any:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(
        tiny_model_dir("llama"), dtype=torch.float32, attn_implementation=attention
    )
    model.train()
    return model


def _row_losses(model: Any, batch: dict[str, torch.Tensor]) -> list[float]:
    """The loss of each row in the batch, summed over its learned tokens, sorted (a packed
    sequence holds several rows; `position_ids` restart at each)."""
    logits = objectives._logits(model, batch)[:, :-1].float()
    labels = batch["labels"][:, 1:]
    token = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")
    positions = batch.get("position_ids", torch.ones_like(batch["input_ids"]))
    segment = (positions == 0).cumsum(-1)[:, 1:]  # the row of each target token
    totals: dict[tuple[int, int], float] = {}
    for (row, i), value in zip(
        (labels != -100).nonzero().tolist(), token[labels != -100], strict=True
    ):
        key = (row, int(segment[row, i]))
        totals[key] = totals.get(key, 0.0) + float(value)
    return sorted(totals.values())


def _grads(model: Any) -> dict[str, torch.Tensor]:
    out = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
@pytest.mark.parametrize("capacity", [40, None])
def test_a_packed_batch_has_the_loss_and_gradients_of_its_rows_run_one_by_one(
    tmp_path: Path, tokenizer: Any, attention: str, capacity: int | None
) -> None:
    dataset = _dataset(tmp_path, tokenizer)
    rows = list(range(len(dataset)))
    model = _model(attention)
    pad = int(tokenizer.pad_token_id)

    packed = dataset.collate_packed(rows, pad, capacity)
    # Fewer sequences than rows, and less padding than right-padded rows.
    assert packed["input_ids"].size(0) < len(rows)
    assert packed["attention_mask"].sum() == sum(dataset.sequence_lengths(rows))
    padded = dataset.collate(rows, pad)
    assert packed["input_ids"].numel() < padded["input_ids"].numel()

    sums = objectives.compute("lm", model, packed, reference=None, beta=0.1)
    torch.autograd.backward(sums.loss)
    packed_grads = _grads(model)
    # Right-padded, the rows run without the padding mask (the causal mask keeps pads
    # out of every real token's view): the same loss and gradients too.
    padded_sums = objectives.compute("lm", model, padded, reference=None, beta=0.1)
    torch.autograd.backward(padded_sums.loss)
    padded_grads = _grads(model)

    alone_loss, alone_count, alone_tokens = torch.tensor(0.0), 0.0, 0
    for row in rows:
        one = objectives.compute("lm", model, dataset.collate([row], pad), reference=None, beta=0.1)
        torch.autograd.backward(one.loss)  # gradients add up over the rows
        alone_loss += one.loss.detach()
        alone_count += one.count
        alone_tokens += one.tokens
    alone_grads = _grads(model)

    assert sums.count == alone_count
    assert sums.tokens == alone_tokens
    torch.testing.assert_close(sums.loss.detach(), alone_loss, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(padded_sums.loss.detach(), alone_loss, rtol=1e-5, atol=1e-4)
    assert alone_grads.keys() == packed_grads.keys() == padded_grads.keys()
    for name, grad in alone_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, rtol=1e-4, atol=1e-5, msg=name)
        torch.testing.assert_close(padded_grads[name], grad, rtol=1e-4, atol=1e-5, msg=name)
    with torch.no_grad():
        per_row = [_row_losses(model, dataset.collate([row], pad))[0] for row in rows]
        assert _row_losses(model, packed) == pytest.approx(sorted(per_row), rel=1e-4)


def test_rows_are_never_split_and_a_row_longer_than_the_capacity_gets_its_own_sequence(
    tmp_path: Path, tokenizer: Any
) -> None:
    dataset = _dataset(tmp_path, tokenizer, count=12)
    rows = list(range(len(dataset)))
    lengths = dataset.sequence_lengths(rows)
    packed = dataset.collate_packed(rows, int(tokenizer.pad_token_id), 5)

    # Every row is one run of positions 0, 1, ..., its length - 1.
    found = []
    for positions, real in zip(packed["position_ids"], packed["attention_mask"], strict=True):
        run = 0
        for position, is_real in zip(positions.tolist(), real.tolist(), strict=True):
            if position == 0 and run:
                found.append(run)
                run = 0
            run += is_real
        if run:
            found.append(run)
    assert sorted(found) == sorted(lengths)
    assert packed["input_ids"].size(1) == max(lengths)  # the longest row sets the width


def test_packing_only_takes_causal_lm_rows(tmp_path: Path, tokenizer: Any) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"text": "good", "label": "yes"}) + "\n")
    dataset = data.load(path, fmt="classification", tokenizer=tokenizer, labels=("yes",), max_len=8)
    with pytest.raises(ValueError):
        dataset.collate_packed([0], 0, 8)


def test_a_packed_job_trains_like_an_unpacked_one(tmp_path: Path) -> None:
    rows = _rows(24, seed=8)
    outcomes = []
    for packing in (False, True):
        spec = make_spec(
            tmp_path / str(packing),
            rows=rows,
            fmt="prompt_completion",
            n_epochs=2,
            batch_size=6,
            learning_rate=1e-2,
        )
        spec = replace(spec, hyperparameters=replace(spec.hyperparameters, packing=packing))
        reports = Reports()
        outcomes.append(run_training(spec, reports))
    plain, packed = outcomes
    assert plain.status == packed.status == "succeeded"
    assert plain.trained_tokens == packed.trained_tokens
    assert packed.metrics["train_loss"] == pytest.approx(plain.metrics["train_loss"], rel=1e-3)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_logits_of_the_learned_positions_only_give_the_same_loss_and_gradients(
    tmp_path: Path, family: str
) -> None:
    """The engine's causal LMs project to the vocabulary only where the next token is
    learned (`objectives.select_logits`, under PEFT's LoRA as in a job)."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir(family))
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in _rows(7)))
    dataset = data.load(path, fmt="prompt_completion", tokenizer=tokenizer, labels=(), max_len=64)
    pad = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
    results = []
    for patched in (False, True):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir(family), dtype=torch.float32)
        if patched:
            assert objectives.select_logits(model)
        target = ["c_attn"] if family == "gpt2" else ["q_proj", "v_proj"]
        model = get_peft_model(
            model,
            LoraConfig(
                r=4, target_modules=target, task_type=TaskType.CAUSAL_LM, init_lora_weights=False
            ),
        )
        model.train()
        rows = list(range(len(dataset)))
        sums = [
            objectives.compute("lm", model, dataset.collate(rows, pad), reference=None, beta=0.1),
            objectives.compute(
                "lm", model, dataset.collate_packed(rows, pad, 64), reference=None, beta=0.1
            ),
        ]
        torch.autograd.backward(sums[0].loss + sums[1].loss)
        results.append((sums, _grads(model)))
    (full, full_grads), (selected, selected_grads) = results
    for a, b in zip(full, selected, strict=True):
        torch.testing.assert_close(b.loss.detach(), a.loss.detach(), rtol=1e-5, atol=1e-4)
        assert (b.count, b.correct, b.tokens) == (a.count, a.correct, a.tokens)
    assert full_grads.keys() == selected_grads.keys()
    assert full_grads
    for name, grad in full_grads.items():
        torch.testing.assert_close(selected_grads[name], grad, rtol=1e-4, atol=1e-5, msg=name)
