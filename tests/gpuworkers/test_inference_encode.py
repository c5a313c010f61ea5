"""Embeddings (sentence-transformers' pooling, `dimensions`) and classification scores."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
from sentence_transformers import SentenceTransformer
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from gpuworkers.inference.scheduler import Engine
from gpuworkers.replies import MemoryChannel
from jobcontracts.inference import InferenceRequest, ModelRef
from tests.gpuworkers.inference_support import (
    classifier_dir,
    lora_classifier_dir,
    model_ref,
    request,
    run,
    running_engine,
    varied_model_dir,
)
from tests.support.models import minilm_dir

TEXTS = (
    "where is my order",
    "the invoice is attached, we are sorry for the delay",
    "Ünïcödé and emoji 🙂 are fine too",
    "refund " * 300,  # longer than MiniLM's 256 tokens: cut as sentence-transformers cuts it
)


@pytest.fixture(scope="module")
def engine() -> Iterator[tuple[Engine, MemoryChannel]]:
    with running_engine() as served:
        yield served


@pytest.fixture(scope="module")
def minilm() -> ModelRef:
    return model_ref(minilm_dir(), task="embeddings", name="all-minilm-l6-v2", context_length=512)


def embedding(ref: ModelRef, inputs: tuple[str, ...], **params: Any) -> InferenceRequest:
    return request(ref, kind="embedding", prompt=None, inputs=inputs, **params)


def test_embeddings_match_sentence_transformers(
    engine: tuple[Engine, MemoryChannel], minilm: ModelRef
) -> None:
    (reply,) = run(*engine, embedding(minilm, TEXTS))
    expected = SentenceTransformer(str(minilm_dir()), device="cpu").encode(
        list(TEXTS), convert_to_tensor=True
    )
    got = torch.tensor(reply.data["embeddings"])
    assert got.shape == (len(TEXTS), 384)
    assert torch.allclose(got, expected.float(), atol=1e-4)

    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    counted = sum(min(256, len(tokenizer(t)["input_ids"])) for t in TEXTS)
    assert reply.data["usage"] == {
        "prompt_tokens": counted,
        "completion_tokens": 0,
        "total_tokens": counted,
    }


def test_dimensions_truncate_then_renormalise(
    engine: tuple[Engine, MemoryChannel], minilm: ModelRef
) -> None:
    full, short = run(
        *engine,
        embedding(minilm, TEXTS[:2]),
        embedding(minilm, TEXTS[:2], dimensions=64),
    )
    vectors = torch.tensor(short.data["embeddings"])
    assert vectors.shape == (2, 64)
    assert torch.allclose(vectors.norm(dim=-1), torch.ones(2), atol=1e-5)
    expected = torch.nn.functional.normalize(torch.tensor(full.data["embeddings"])[:, :64], dim=-1)
    assert torch.allclose(vectors, expected, atol=1e-6)

    (too_many,) = run(*engine, embedding(minilm, TEXTS[:1], dimensions=385))
    assert too_many.type == "error"
    assert too_many.data["code"] == "invalid_dimensions"


def test_requests_encoded_together_get_the_same_vectors_as_alone(
    engine: tuple[Engine, MemoryChannel], minilm: ModelRef
) -> None:
    many = [embedding(minilm, (text,)) for text in TEXTS[:3]]
    together = run(*engine, *many)
    alone = [run(*engine, embedding(minilm, (text,)))[0] for text in TEXTS[:3]]
    for a, b in zip(together, alone, strict=True):
        assert torch.allclose(
            torch.tensor(a.data["embeddings"]), torch.tensor(b.data["embeddings"]), atol=1e-5
        )


def test_a_causal_model_embeds_by_mean_pooling_its_last_hidden_state(
    engine: tuple[Engine, MemoryChannel],
) -> None:
    ref = model_ref(varied_model_dir())
    (reply,) = run(*engine, embedding(ref, TEXTS[:2]))
    vectors = torch.tensor(reply.data["embeddings"])
    assert vectors.shape == (2, 64)
    assert torch.allclose(vectors.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert not torch.allclose(vectors[0], vectors[1])


def test_classification_scores_every_label_and_sums_to_one(
    engine: tuple[Engine, MemoryChannel],
) -> None:
    folder = classifier_dir()
    labels = ("negative", "neutral", "positive")
    ref = model_ref(folder, task="classification", name="sentiment", labels=labels)
    (reply,) = run(*engine, request(ref, kind="classification", prompt=None, inputs=TEXTS[:3]))

    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    with torch.inference_mode():
        batch = tokenizer(list(TEXTS[:3]), padding=True, return_tensors="pt")
        expected = torch.softmax(model(**batch).logits, dim=-1)
    results = reply.data["classifications"]
    assert len(results) == 3
    for result, probs in zip(results, expected, strict=True):
        assert set(result["scores"]) == set(labels)
        assert sum(result["scores"].values()) == pytest.approx(1.0, abs=1e-5)
        assert result["label"] == labels[int(probs.argmax())]
        assert result["score"] == pytest.approx(float(probs.max()), abs=1e-5)
        for i, label in enumerate(labels):
            assert result["scores"][label] == pytest.approx(float(probs[i]), abs=1e-5)


def test_lora_classifiers_share_one_base_and_each_scores_with_its_own_head(
    engine: tuple[Engine, MemoryChannel],
) -> None:
    from peft import PeftModel

    served, channel = engine
    labels = ("no", "yes")
    adapters = [lora_classifier_dir("x", 3), lora_classifier_dir("y", 4)]
    refs = [
        model_ref(minilm_dir(), task="classification", adapter=a, labels=labels) for a in adapters
    ]
    uri = f"file://{minilm_dir()}"
    loads_before = served.stats.loads[uri]  # the module's embedding tests load it as an encoder
    replies = run(
        served,
        channel,
        *(request(ref, kind="classification", prompt=None, inputs=TEXTS[:2]) for ref in refs),
    )
    assert served.stats.loads[uri] - loads_before == 1  # one classifier base for both adapters
    assert served.stats.adapter_loads[f"file://{adapters[0]}"] == 1

    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    batch = tokenizer(list(TEXTS[:2]), padding=True, truncation=True, return_tensors="pt")
    found = []
    for adapter, reply in zip(adapters, replies, strict=True):
        base = AutoModelForSequenceClassification.from_pretrained(minilm_dir(), num_labels=2)
        model = PeftModel.from_pretrained(base, str(adapter)).eval()
        with torch.inference_mode():
            expected = torch.softmax(model(**batch).logits, dim=-1)
        got = torch.tensor(
            [[r["scores"][label] for label in labels] for r in reply.data["classifications"]]
        )
        assert torch.allclose(got, expected, atol=1e-5)
        found.append(got)
    assert not torch.allclose(found[0], found[1], atol=1e-3)
