"""Which tokens each format learns, truncation, and the seeded batch order."""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from gpuworkers.training import data
from gpuworkers.training.engine import run_training
from gpuworkers.training.errors import TrainingError
from jobcontracts.training import Hyperparameters, Signal
from tests.gpuworkers.helpers import PREFERENCE_ROWS, Reports, ScriptedSignals, final_dir, make_spec
from tests.support.models import tiny_model_dir


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return AutoTokenizer.from_pretrained(tiny_model_dir("llama"))


def _load(tmp_path: Path, tokenizer: Any, fmt: str, rows: list[Any], **kw: Any) -> Any:
    path = tmp_path / "rows.jsonl"
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return data.load(
        path,
        fmt=fmt,
        tokenizer=tokenizer,
        labels=kw.pop("labels", ()),
        max_len=kw.pop("max_len", 256),
    )


def _learned_text(tokenizer: Any, dataset: Any, seq: int) -> str:
    a, b = dataset.starts[seq], dataset.starts[seq + 1]
    ids = [i for i, learn in zip(dataset.ids[a:b], dataset.learn[a:b], strict=True) if learn]
    return str(tokenizer.decode(ids))


def test_chat_learns_only_the_assistant_turns(tmp_path: Path, tokenizer: Any) -> None:
    row = {
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "hello"},
            {"role": "assistant", "content": "how can i help"},
            {"role": "user", "content": "refunds"},
            {"role": "assistant", "content": "we are sorry", "weight": 0},
            {"role": "user", "content": "ok"},
            {"role": "assistant", "content": "thank you"},
        ]
    }
    dataset = _load(tmp_path, tokenizer, "chat", [row])

    a, b = dataset.starts[0], dataset.starts[1]
    whole = tokenizer.apply_chat_template(row["messages"], tokenize=False)
    assert tokenizer.decode(dataset.ids[a:b]) == whole
    # Each learned turn ends with its end-of-turn marker, so the model learns to stop;
    # the turn with weight 0 is context only.
    assert _learned_text(tokenizer, dataset, 0) == (
        "how can i help<|im_end|>\nthank you<|im_end|>\n"
    )


def test_prompt_completion_learns_the_completion_and_the_end_token(
    tmp_path: Path, tokenizer: Any
) -> None:
    dataset = _load(
        tmp_path, tokenizer, "prompt_completion", [{"prompt": "the cat", "completion": " sat"}]
    )

    assert _learned_text(tokenizer, dataset, 0) == " sat<|endoftext|>"
    assert tokenizer.decode(dataset.ids) == "the cat sat<|endoftext|>"


def test_preference_rows_hold_chosen_then_rejected(tmp_path: Path, tokenizer: Any) -> None:
    dataset = _load(tmp_path, tokenizer, "preference", PREFERENCE_ROWS)

    assert len(dataset) == 4
    assert dataset.per_row == 2
    assert _learned_text(tokenizer, dataset, 0) == " it has shipped<|endoftext|>"
    assert _learned_text(tokenizer, dataset, 1) == " bad terrible<|endoftext|>"
    # A conversation prompt: the response is the assistant turn the template renders.
    assert _learned_text(tokenizer, dataset, 4) == "how can i help today<|im_end|>\n"
    batch = dataset.collate([0, 2], pad_id=3)
    assert batch["input_ids"].shape[0] == 4  # chosen 0, chosen 2, rejected 0, rejected 2


def test_truncation_keeps_the_completion_when_the_prompt_is_too_long(
    tmp_path: Path, tokenizer: Any
) -> None:
    prompt = " ".join(["one two three"] * 50)
    dataset = _load(
        tmp_path,
        tokenizer,
        "prompt_completion",
        [{"prompt": prompt, "completion": " four five"}, {"prompt": "a", "completion": prompt}],
        max_len=12,
    )

    assert len(dataset.ids) == 24
    assert _learned_text(tokenizer, dataset, 0) == " four five<|endoftext|>"
    assert sum(dataset.learn[12:24]) == 11  # a long completion: cut at the end


def test_classification_maps_labels_by_name_and_number(tmp_path: Path, tokenizer: Any) -> None:
    rows = [{"text": "good", "label": "yes"}, {"text": "bad", "label": 0}]
    dataset = _load(tmp_path, tokenizer, "classification", rows, labels=("0", "yes"))

    assert list(dataset.labels) == [1, 0]
    assert dataset.collate([0, 1], pad_id=3)["labels"].tolist() == [1, 0]


def test_text_lines_may_be_plain_or_json_objects(tmp_path: Path, tokenizer: Any) -> None:
    dataset = _load(tmp_path, tokenizer, "text", ["plain line", "", '{"text": "json line"}'])

    assert len(dataset) == 2
    assert _learned_text(tokenizer, dataset, 1) == "json line<|endoftext|>"


def test_a_bad_row_names_its_line(tmp_path: Path, tokenizer: Any) -> None:
    rows: list[Any] = [{"prompt": "a", "completion": "b"}, "", ["not", "an", "object"]]
    with pytest.raises(TrainingError) as caught:
        _load(tmp_path, tokenizer, "prompt_completion", rows)

    assert caught.value.code == "invalid_training_file"
    assert "line 3" in caught.value.message


def test_batch_order_is_a_seeded_permutation_per_epoch() -> None:
    order = data.BatchOrder(n_rows=10, batch_size=3, seed=5)

    assert order.per_epoch == 4
    epoch_1 = [row for step in range(1, 5) for row in order.rows(step)]
    epoch_2 = [row for step in range(5, 9) for row in order.rows(step)]
    assert sorted(epoch_1) == sorted(epoch_2) == list(range(10))
    assert epoch_1 != epoch_2
    assert len(order.rows(4)) == 1
    # A fresh order (a resumed attempt) gives step 6 the same rows.
    assert data.BatchOrder(10, 3, 5).rows(6) == order.rows(6)
    assert data.BatchOrder(10, 3, 6).rows(6) != order.rows(6)


def _mixed_lengths(n: int = 200, seed: int = 3) -> list[int]:
    r = random.Random(seed)
    return [r.choice((r.randint(4, 30), r.randint(30, 120), r.randint(120, 256))) for _ in range(n)]


def test_length_grouped_order_is_the_same_after_a_restart_at_any_step() -> None:
    lengths = _mixed_lengths()
    uninterrupted = data.BatchOrder(200, 8, seed=11, lengths=lengths, mega_batch_factor=5)
    steps = uninterrupted.per_epoch * 3
    expected = [uninterrupted.rows(step) for step in range(1, steps + 1)]

    for k in (1, 7, uninterrupted.per_epoch, uninterrupted.per_epoch + 1, steps - 2):
        resumed = data.BatchOrder(200, 8, seed=11, lengths=lengths, mega_batch_factor=5)
        assert [resumed.rows(step) for step in range(k, steps + 1)] == expected[k - 1 :]
    # The epochs differ, and another seed gives other batches.
    per = uninterrupted.per_epoch
    assert expected[:per] != expected[per : 2 * per]
    other = data.BatchOrder(200, 8, seed=12, lengths=lengths, mega_batch_factor=5)
    assert [other.rows(step) for step in range(1, per + 1)] != expected[:per]


def test_length_grouped_order_sees_every_row_once_per_epoch() -> None:
    lengths = _mixed_lengths(n=203)
    order = data.BatchOrder(203, 8, seed=5, lengths=lengths, mega_batch_factor=4)

    assert order.per_epoch == 26
    for epoch in range(3):
        steps = range(epoch * order.per_epoch + 1, (epoch + 1) * order.per_epoch + 1)
        batches = [order.rows(step) for step in steps]
        assert sorted(row for rows in batches for row in rows) == list(range(203))
        assert sorted(len(rows) for rows in batches) == [3] + [8] * 25


def test_length_grouping_lowers_the_padding_of_a_mixed_length_set(
    tmp_path: Path, tokenizer: Any
) -> None:
    r = random.Random(9)
    words = ["the", "cat", "sat", "on", "a", "mat", "and", "then", "it", "ran", "to", "the", "door"]
    rows = [" ".join(r.choice(words) for _ in range(r.choice((3, 12, 40, 90)))) for _ in range(160)]
    dataset = _load(tmp_path, tokenizer, "text", rows)
    lengths = dataset.row_lengths()
    assert len(set(lengths)) > 4

    def share(order: data.BatchOrder) -> float:
        return data.padding_share(dataset, [order.rows(s) for s in range(1, order.per_epoch + 1)])

    plain = share(data.BatchOrder(len(dataset), 8, seed=1))
    grouped = share(data.BatchOrder(len(dataset), 8, seed=1, lengths=lengths))
    assert plain > 0.3
    assert grouped < plain / 4
    # What the engine trains on by default.
    assert Hyperparameters(1, 8, 1e-3, 64, 1).group_by_length is True


def _varied_rows(count: int) -> list[dict[str, str]]:
    r = random.Random(2)
    words = ["the", "cat", "sat", "on", "a", "mat", "and", "then", "it", "ran", "to", "the", "door"]
    return [
        {
            "prompt": " ".join(r.choice(words) for _ in range(r.choice((1, 4, 12)))),
            "completion": " " + " ".join(r.choice(words) for _ in range(r.choice((2, 9, 30)))),
        }
        for _ in range(count)
    ]


PAUSE_1 = Signal(1, "pause")


def _adapter(spec: Any) -> dict[str, Any]:
    return load_file(final_dir(spec) / "adapter_model.safetensors")


@pytest.mark.parametrize("old_order", [False, True])
def test_a_resumed_job_trains_on_the_batches_of_an_uninterrupted_one(
    tmp_path: Path, old_order: bool
) -> None:
    """Grouped by length (the default), or, from a checkpoint made before grouping was
    the default, in the order that checkpoint's job began with."""
    rows = _varied_rows(24)
    kwargs: dict[str, Any] = dict(rows=rows, fmt="prompt_completion", n_epochs=2, batch_size=2)
    straight = make_spec(tmp_path / "straight", **kwargs)
    if old_order:
        hp = dataclasses.replace(straight.hyperparameters, group_by_length=False)
        straight = dataclasses.replace(straight, hyperparameters=hp)
    whole = run_training(straight, Reports(), signal_reader=lambda: None)
    assert whole.status == "succeeded"
    assert whole.step == 24

    spec = make_spec(tmp_path / "paused", **kwargs)
    if old_order:
        spec = dataclasses.replace(spec, hyperparameters=straight.hyperparameters)
    paused = run_training(spec, Reports(), signal_reader=ScriptedSignals(*[None] * 8, PAUSE_1))
    assert paused.status == "paused"
    assert paused.checkpoint_uri is not None
    checkpoint = Path(paused.checkpoint_uri.removeprefix("file://"))
    if old_order:  # as the engine wrote it before length grouping
        state = json.loads((checkpoint / "trainer_state.json").read_text())
        assert "grouped" not in state["rng"]
        state["rng"] = (
            "data order: randperm(seed*1000003+epoch); step n: manual_seed(seed*1000003+n)"
        )
        (checkpoint / "trainer_state.json").write_text(json.dumps(state))
    # Attempt 2 runs the new default, whatever order the checkpoint's job began with.
    resumed_spec = dataclasses.replace(
        spec,
        attempt=2,
        resume_from=paused.checkpoint_uri,
        hyperparameters=make_spec(tmp_path / "x", **kwargs).hyperparameters,
    )
    resumed = run_training(resumed_spec, Reports(), signal_reader=lambda: Signal(2, "run"))

    assert resumed.status == "succeeded"
    assert resumed.trained_tokens == whole.trained_tokens
    expected, got = _adapter(straight), _adapter(resumed_spec)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-6)
