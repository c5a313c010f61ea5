"""Token counts of stored datasets match the base model's own tokenizer, in every format."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

import pytest
from django.core.files.base import ContentFile
from django.core.files.storage import default_storage
from tokenizers import Tokenizer

from controlplane.modelregistry import services, tokens
from controlplane.modelregistry.models import BaseModel
from tests.support.models import minilm_dir, tiny_model_dir

pytestmark = pytest.mark.django_db


def reference(model_dir: Path) -> Tokenizer:
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return tokenizer


def count(tokenizer: Tokenizer, text: str) -> int:
    return len(tokenizer.encode(text).ids)


def store(lines: list[str] | bytes, name: str = "data") -> str:
    content = lines if isinstance(lines, bytes) else "".join(f"{line}\n" for line in lines).encode()
    return default_storage.save(f"files/test/{name}", ContentFile(content))


def jsonl(rows: list[dict[str, object]]) -> list[str]:
    return [json.dumps(row) for row in rows]


@pytest.fixture
def minilm(db: None) -> BaseModel:
    return services.base_model_import(
        path=minilm_dir(), name="all-MiniLM-L6-v2", price_per_1k_training_tokens="0.0001"
    )


CHAT = [
    {
        "messages": [
            {"role": "system", "content": "you help with orders"},
            {"role": "user", "content": f"where is order {i} please"},
            {"role": "assistant", "content": "your order has shipped " * (i + 1)},
        ]
    }
    for i in range(5)
]


def chatml(messages: list[dict[str, str]]) -> str:
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)


def test_chat_rows_are_rendered_as_chatml_when_the_tokenizer_has_its_tokens(
    tiny_llama: BaseModel,
) -> None:
    ref = reference(tiny_model_dir("llama"))
    assert ref.token_to_id("<|im_start|>") is not None
    expected = [count(ref, chatml(row["messages"])) for row in CHAT]  # type: ignore[arg-type]

    stats = tokens.count_dataset_tokens(
        base=tiny_llama, storage_name=store(["", *jsonl(CHAT), "  "]), format="chat"
    )

    assert stats.rows == stats.sequences == 5
    assert stats.total_tokens == sum(expected)
    assert stats.trained_tokens == sum(min(n, 256) for n in expected)
    assert (stats.lengths.min, stats.lengths.max) == (min(expected), max(expected))
    assert stats.to_dict()["per_row"]["p50"] == sorted(expected)[2]
    assert stats.rows_over_context == 0
    assert stats.skipped_rows == 0


def test_chat_without_chatml_tokens_joins_role_and_content(minilm: BaseModel) -> None:
    ref = reference(minilm_dir())
    assert ref.token_to_id("<|im_start|>") is None
    expected = [
        count(ref, "".join(f"{m['role']}\n{m['content']}\n" for m in row["messages"]))  # type: ignore[attr-defined]
        for row in CHAT
    ]

    stats = tokens.count_dataset_tokens(base=minilm, storage_name=store(jsonl(CHAT)), format="chat")

    assert stats.total_tokens == sum(expected)


def test_prompt_completion_counts_prompt_plus_completion(tiny_llama: BaseModel) -> None:
    rows = [{"prompt": f"say {i}", "completion": " thank you" * i} for i in range(1, 8)]
    ref = reference(tiny_model_dir("llama"))

    stats = tokens.count_dataset_tokens(
        base=tiny_llama, storage_name=store(jsonl(rows)), format="prompt_completion"
    )

    assert stats.rows == 7
    assert stats.total_tokens == sum(count(ref, r["prompt"] + r["completion"]) for r in rows)  # type: ignore[operator]


def test_preference_rows_are_two_sequences_and_as_long_as_the_longer(
    tiny_llama: BaseModel,
) -> None:
    messages = [{"role": "user", "content": "hello"}]
    rows = [
        {"prompt": "the cat", "chosen": " sat on the mat", "rejected": " no"},
        {"prompt": messages, "chosen": "great", "rejected": "terrible terrible terrible"},
    ]
    ref = reference(tiny_model_dir("llama"))
    first = [count(ref, "the cat sat on the mat"), count(ref, "the cat no")]
    second = [
        count(ref, chatml(messages) + "great"),
        count(ref, chatml(messages) + "terrible terrible terrible"),
    ]

    stats = tokens.count_dataset_tokens(
        base=tiny_llama, storage_name=store(jsonl(rows)), format="preference"
    )

    assert (stats.rows, stats.sequences) == (2, 4)
    assert stats.total_tokens == sum(first) + sum(second)
    assert (stats.lengths.min, stats.lengths.max) == tuple(sorted([max(first), max(second)]))


def test_pairs_rows_are_the_query_and_the_positive_each_on_its_own(minilm: BaseModel) -> None:
    rows = [
        {"query": "how do I reset my password", "positive": "Open settings, then security."},
        {"query": "refund", "positive": "Refunds arrive within five working days of the return."},
    ]
    ref = reference(minilm_dir())
    lengths = [[count(ref, r["query"]), count(ref, r["positive"])] for r in rows]

    stats = tokens.count_dataset_tokens(
        base=minilm, storage_name=store(jsonl(rows)), format="pairs"
    )

    assert (stats.rows, stats.sequences) == (2, 4)
    assert stats.total_tokens == sum(map(sum, lengths))
    assert (stats.lengths.min, stats.lengths.max) == tuple(sorted(max(n) for n in lengths))


def test_classification_and_text_count_the_text(minilm: BaseModel) -> None:
    ref = reference(minilm_dir())
    texts = ["good product", "terrible, never again", "fine I guess"]
    rows = [{"text": t, "label": "x"} for t in texts]

    classified = tokens.count_dataset_tokens(
        base=minilm, storage_name=store(jsonl(rows)), format="classification"
    )
    plain = tokens.count_dataset_tokens(base=minilm, storage_name=store(texts), format="text")

    expected = sum(count(ref, t) for t in texts)  # [CLS] and [SEP] included
    assert classified.total_tokens == plain.total_tokens == expected
    assert expected == sum(len(ref.encode(t, add_special_tokens=False).ids) + 2 for t in texts)


def test_csv_counts_the_text_column_or_else_every_column(minilm: BaseModel) -> None:
    ref = reference(minilm_dir())
    with_text = store(["id,text,label", '1,"hello, world",a', "2,good bye,b"], "a.csv")
    without = store(["question,answer", "why,because", '"who, then",me'], "b.csv")

    assert tokens.count_dataset_tokens(
        base=minilm, storage_name=with_text, format="csv"
    ).total_tokens == count(ref, "hello, world") + count(ref, "good bye")
    assert tokens.count_dataset_tokens(
        base=minilm, storage_name=without, format="csv"
    ).total_tokens == count(ref, "why\nbecause") + count(ref, "who, then\nme")


def test_saved_truncation_and_padding_do_not_cap_counts(minilm: BaseModel) -> None:
    """MiniLM's tokenizer.json truncates at 128 and pads to 128: a count must do neither."""
    long = "word " * 300
    stats = tokens.count_dataset_tokens(
        base=minilm, storage_name=store([long, "hi"]), format="text"
    )
    assert stats.lengths.max == 302
    assert stats.lengths.min == 3


def test_rows_over_the_context_and_the_sequence_limit(tiny_llama: BaseModel) -> None:
    ref = reference(tiny_model_dir("llama"))
    texts = ["one two three", "the cat sat on the mat " * 60, "hello " * 100]
    lengths = [count(ref, t) for t in texts]
    assert lengths[1] > 256 >= lengths[2] > 50 > lengths[0]

    stats = tokens.count_dataset_tokens(
        base=tiny_llama, storage_name=store(texts), format="text", max_seq_len=50
    )

    assert stats.total_tokens == sum(lengths)
    assert stats.trained_tokens == lengths[0] + 50 + 50
    assert stats.rows_over_context == 1
    assert stats.rows_over_max_seq_len == 2
    assert stats.to_dict()["rows_over_max_seq_len"] == 2


def test_batches_of_any_size_give_the_same_counts(
    tiny_llama: BaseModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    texts = [f"the order {i} has shipped " * (1 + i % 7) for i in range(50)]
    name = store(texts)
    whole = tokens.count_dataset_tokens(base=tiny_llama, storage_name=name, format="text")

    monkeypatch.setattr(tokens, "BATCH_SEQUENCES", 3)
    batched = tokens.count_dataset_tokens(base=tiny_llama, storage_name=name, format="text")

    assert batched.to_dict() == whole.to_dict()
    assert whole.rows == 50


def test_unparseable_lines_are_skipped_and_counted(tiny_llama: BaseModel) -> None:
    content = b'{"text": "fine", "label": 1}\n[1, 2]\nnot json\n\xff\xfe\n'
    stats = tokens.count_dataset_tokens(
        base=tiny_llama, storage_name=store(content), format="classification"
    )
    assert (stats.rows, stats.skipped_rows) == (1, 3)


def test_the_tokenizer_is_loaded_once_per_process(tiny_llama: BaseModel) -> None:
    assert tokens.tokenizer_for(tiny_llama) is tokens.tokenizer_for(tiny_llama)


def test_unknown_formats_are_refused(tiny_llama: BaseModel) -> None:
    with pytest.raises(ValueError, match="unknown format"):
        tokens.count_dataset_tokens(base=tiny_llama, storage_name=store(["x"]), format="xml")


def test_training_price_is_tokens_times_epochs_per_thousand_times_price() -> None:
    base = BaseModel(price_per_1k_training_tokens=Decimal("0.000800"))
    assert tokens.training_price(base=base, tokens=1536, n_epochs=3) == Decimal("0.0036864")
    assert tokens.training_price(base=base, tokens=0, n_epochs=3) == 0


@pytest.mark.parametrize(
    ("rows", "epochs"),
    [(1, 25), (10, 10), (20, 5), (34, 3), (1000, 3), (8333, 3), (8334, 2), (30000, 1)],
)
def test_auto_epochs_follows_openais_heuristic(rows: int, epochs: int) -> None:
    assert tokens.auto_epochs(rows) == epochs
