"""Distillation makes a student with fewer layers, started from evenly spaced teacher
layers, and training brings it closer to the teacher: on texts the teacher writes itself
(a causal LM without training rows) and, for the real MiniLM, in cosine similarity."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModel, AutoModelForSequenceClassification

from gpuworkers.compression import recovery
from gpuworkers.compression.context import CompressionError, Work
from gpuworkers.compression.distill import (
    chosen_layers,
    distill,
    spaced_layers,
    student_from_teacher,
)
from gpuworkers.compression.prune import keep_layers
from gpuworkers.models import tiny
from gpuworkers.training.errors import StaleAttempt
from tests.gpuworkers.test_compression_prune import HELD_OUT, embed, fit, ids, kd_to_source, lm
from tests.gpuworkers.test_compression_prune import one_thread as one_thread
from tests.support.models import minilm_dir

CPU = torch.device("cpu")


def sentences(start: int, stop: int) -> list[str]:
    """Varied plain sentences (distinct subjects, verbs, objects and endings)."""
    who = ("My sister", "The old driver", "A tired customer", "Our new team", "The teacher")
    did = ("bought", "lost", "repaired", "painted", "returned", "described", "found")
    what = ("a red bicycle", "the kitchen table", "an unpaid invoice", "two concert tickets")
    when = ("on Monday.", "after the storm.", "before lunch.", "in the garden.", "yesterday.")
    rows = [" ".join(r) for r in itertools.product(who, did, what, when)]
    # A stride through the product so neighbouring rows differ in every slot.
    return [rows[(i * 37) % len(rows)] for i in range(start, stop)]


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-layer tiny Llama trained a little on the corpus."""
    return fit(
        tiny.build("llama", tmp_path_factory.mktemp("teacher") / "llama", hidden=128, layers=4)
    )


def run(
    source: Path, out: Path, task: str = "causal_lm", **options: Any
) -> tuple[Work, list[float]]:
    losses: list[float] = []
    work = Work(
        task=task,
        method="distill",
        source_dir=source,
        out_dir=out,
        options=options,
        device=CPU,
        train_texts=list(options.pop("texts", [])),
        train_labels=list(options.pop("train_labels", [])),
        labels=tuple(options.pop("labels", ())),
        student_dir=options.pop("student_dir", None),
        step=lambda step, total, loss: losses.append(float(loss or 0.0)),
    )
    distill(work)
    return work, losses


def test_spaced_layers_keep_the_first_and_the_last() -> None:
    assert spaced_layers(6, 3) == [0, 2, 5]
    assert spaced_layers(12, 4) == [0, 4, 7, 11]
    assert spaced_layers(4, 2) == [0, 3]
    assert spaced_layers(5, 4) == [0, 1, 3, 4]


def test_the_student_starts_as_the_chosen_teacher_layers(teacher_dir: Path) -> None:
    teacher = lm(teacher_dir)
    student, keep = student_from_teacher(teacher, 2)

    assert keep == [0, 3]
    assert student.config.num_hidden_layers == 2
    for mine, theirs in zip(
        student.model.layers, (teacher.model.layers[i] for i in keep), strict=True
    ):
        for (name, a), (_, b) in zip(
            mine.state_dict().items(), theirs.state_dict().items(), strict=True
        ):
            assert torch.equal(a, b), name
    assert torch.equal(student.model.embed_tokens.weight, teacher.model.embed_tokens.weight)
    assert torch.equal(student.model.norm.weight, teacher.model.norm.weight)


def test_a_causal_lm_distils_on_texts_its_teacher_writes(teacher_dir: Path, tmp_path: Path) -> None:
    work, losses = run(
        teacher_dir, tmp_path / "out", student_layers=2, steps=16, generated_rows=16, batch_size=4
    )

    assert work.notes["training_texts"] == {"generated_by_teacher": 16}
    assert work.notes["layers_from_teacher"] == [0, 3]
    result = lm(tmp_path / "out")
    assert result.config.num_hidden_layers == 2
    assert len(losses) == 16
    assert sum(losses[-4:]) < sum(losses[:4]) * 0.9
    teacher = lm(teacher_dir)
    inputs = ids(teacher_dir, HELD_OUT)
    untrained = kd_to_source(teacher, student_from_teacher(teacher, 2)[0], inputs)
    assert kd_to_source(teacher, result, inputs) < untrained * 0.85


def test_a_minilm_student_gets_closer_to_its_teacher(tmp_path: Path) -> None:
    out = tmp_path / "out"
    work, losses = run(
        minilm_dir(),
        out,
        task="embeddings",
        student_layers=3,
        steps=12,
        batch_size=16,
        learning_rate=2e-4,
        texts=sentences(0, 48),
    )

    teacher = AutoModel.from_pretrained(str(minilm_dir()), use_safetensors=True).eval()
    student = AutoModel.from_pretrained(str(out), use_safetensors=True).eval()
    assert student.config.num_hidden_layers == 3
    keep = work.notes["layers_from_teacher"]
    assert keep == [0, 4, 5]  # chosen on the rows (see the next test)
    assert work.notes["layer_selection"]["rows"] == 48
    for name in ("modules.json", "sentence_bert_config.json", "1_Pooling/config.json"):
        assert (out / name).exists()
    assert sum(losses[-3:]) < sum(losses[:3])
    held_out = ids(out, sentences(200, 216))
    goal = embed(teacher, held_out)
    untrained = (embed(keep_layers(teacher, keep), held_out) * goal).sum(-1).mean()
    trained = (embed(student, held_out) * goal).sum(-1).mean()
    assert float(trained) > float(untrained) + 0.05


def test_the_student_keeps_the_layers_the_teacher_needs_most() -> None:
    teacher = AutoModel.from_pretrained(str(minilm_dir()), use_safetensors=True).eval()
    tokenizer = recovery.load_tokenizer(minilm_dir())
    batches = recovery.make_batches(
        tokenizer, sentences(0, 32), batch_size=16, max_len=128, device=CPU
    )

    keep, similarity = chosen_layers(teacher, batches, 3)

    assert (len(keep), keep[0], keep[-1]) == (3, 0, 5)
    assert 0 < similarity < 1
    assert len(teacher.encoder.layer) == 6  # tried out in place, then put back
    # On other rows, the chosen layers are closer to the teacher than evenly spaced ones.
    held_out = ids(minilm_dir(), sentences(200, 216))
    goal = embed(teacher, held_out)
    chosen = (embed(keep_layers(teacher, keep), held_out) * goal).sum(-1).mean()
    spaced = (embed(keep_layers(teacher, spaced_layers(6, 3)), held_out) * goal).sum(-1).mean()
    assert float(chosen) > float(spaced) + 0.02


def test_a_classifier_distils_onto_its_labels(tmp_path: Path) -> None:
    texts = sentences(0, 16)
    _work, losses = run(
        minilm_dir(),
        tmp_path / "out",
        task="classification",
        student_layers=2,
        steps=3,
        texts=texts,
        train_labels=[i % 2 for i in range(16)],
        labels=("negative", "positive"),
    )

    model = AutoModelForSequenceClassification.from_pretrained(
        str(tmp_path / "out"), use_safetensors=True
    )
    assert model.config.num_hidden_layers == 2
    assert model.config.id2label == {0: "negative", 1: "positive"}
    with torch.no_grad():
        assert model(**ids(tmp_path / "out", texts[:2])).logits.shape == (2, 2)
    assert len(losses) == 3


def test_a_chosen_student_must_share_the_tokenizer_and_be_smaller(
    teacher_dir: Path, tmp_path: Path
) -> None:
    small = tiny.build("llama", tmp_path / "small", hidden=64, layers=2)
    work, losses = run(teacher_dir, tmp_path / "out", student_dir=small, steps=2, texts=HELD_OUT)
    assert work.notes["student"] == "chosen model"
    assert lm(tmp_path / "out").config.hidden_size == 64
    assert len(losses) == 2

    other = tiny.build("llama", tmp_path / "other", hidden=64, layers=2, vocab_size=300)
    with pytest.raises(CompressionError) as raised:
        run(teacher_dir, tmp_path / "out2", student_dir=other, steps=2, texts=HELD_OUT)
    assert (raised.value.code, raised.value.param) == ("incompatible_student", "student")

    with pytest.raises(CompressionError) as raised:
        run(teacher_dir, tmp_path / "out3", student_dir=teacher_dir, steps=2, texts=HELD_OUT)
    assert raised.value.param == "student_layers"


def test_an_exception_from_step_stops_distillation(teacher_dir: Path, tmp_path: Path) -> None:
    def step(index: int, total: int, loss: float | None) -> None:
        if index == 3:
            raise StaleAttempt

    work = Work(
        task="causal_lm",
        method="distill",
        source_dir=teacher_dir,
        out_dir=tmp_path / "out",
        options={"steps": 50},
        device=CPU,
        train_texts=HELD_OUT,
        step=step,
    )
    with pytest.raises(StaleAttempt):
        distill(work)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("options", "param"),
    [
        ({"student_layers": 4}, "student_layers"),  # not fewer than the teacher's 4
        ({"student_layers": 0}, "student_layers"),
        ({"student_layers": "two"}, "student_layers"),
        ({"temperature": 0}, "temperature"),
        ({"alpha": 1.5}, "alpha"),
        ({"steps": 0}, "steps"),
        ({"learning_rate": -1}, "learning_rate"),
        ({"generated_rows": 0}, "generated_rows"),
    ],
)
def test_bad_options_name_the_option(
    teacher_dir: Path, tmp_path: Path, options: dict[str, Any], param: str
) -> None:
    with pytest.raises(CompressionError) as raised:
        run(teacher_dir, tmp_path / "out", **options)
    assert raised.value.param == param


def test_an_embedding_model_needs_training_rows(tmp_path: Path) -> None:
    with pytest.raises(CompressionError) as raised:
        run(minilm_dir(), tmp_path / "out", task="embeddings", student_layers=3, steps=2)
    assert raised.value.code == "training_data_required"


def test_pooling_follows_the_sentence_transformers_config(tmp_path: Path) -> None:
    assert recovery.pooling_of(minilm_dir()) == recovery.Pooling("mean", True)
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text('{"pooling_mode_cls_token": true}')
    (tmp_path / "modules.json").write_text(
        '[{"path": "", "type": "sentence_transformers.models.Transformer"},'
        ' {"path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]'
    )
    assert recovery.pooling_of(tmp_path) == recovery.Pooling("cls", False)


def test_hidden_states_are_matched_on_real_tokens_only() -> None:
    torch.manual_seed(0)
    teacher = torch.randn(2, 5, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    assert float(recovery.hidden_match(teacher.clone(), teacher, mask)) == pytest.approx(
        0.0, abs=1e-6
    )
    padded = teacher.clone()
    padded[0, 3:] = 100.0  # padding: whatever it holds is not learned
    assert float(recovery.hidden_match(padded, teacher, mask)) == pytest.approx(0.0, abs=1e-6)
    moved = teacher.clone()
    moved[1, 0] = -moved[1, 0]
    assert float(recovery.hidden_match(moved, teacher, mask)) > 0.1
    # Relative to the teacher's size: a tenfold model with tenfold errors scores alike.
    assert float(recovery.hidden_match(moved * 10, teacher * 10, mask)) == pytest.approx(
        float(recovery.hidden_match(moved, teacher, mask)), rel=1e-4
    )


def test_each_student_layer_is_matched_to_the_teacher_layer_it_came_from() -> None:
    teacher = AutoModel.from_pretrained(str(minilm_dir()), use_safetensors=True).eval()
    student, keep = student_from_teacher(teacher, 3)
    # hidden_states[0] is the embeddings; the last layer is matched on its own.
    assert recovery.layer_pairs(student, teacher, keep) == [(1, 1), (2, 3)]
    # Pruned heads and channels: as many layers, each matched to itself.
    assert recovery.layer_pairs(teacher, teacher, None) == [(i, i) for i in range(1, 6)]
    # A chosen student of other depth has no map: only its last layer is matched.
    assert recovery.layer_pairs(student, teacher, None) == []
    assert recovery.layer_pairs(student, teacher, [0, 2, 9]) == []
