"""Which tokens each format learns, truncation, and the seeded batch order."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer

from gpuworkers.training import data
from gpuworkers.training.errors import TrainingError
from tests.gpuworkers.helpers import PREFERENCE_ROWS
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
