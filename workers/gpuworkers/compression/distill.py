"""Knowledge distillation: train a smaller student to do what the source (the teacher) does.

The student is the teacher cut to `student_layers` layers taken evenly spaced from it
(the first and the last always among them), which starts far closer to the teacher than
a fresh model; or, when the job names one, a chosen smaller model of the same tokenizer
(`student_layers` is then not used).

Objectives (see `recovery.objective`): a causal LM learns the teacher's token
distributions at temperature T (KL x T^2, weight alpha) and the text itself (CE, weight
1 - alpha), on the training rows or, with none, on texts sampled from the teacher; an
embedding model learns the teacher's pooled, normalised sentence embeddings; a classifier
the teacher's logits and, where rows are labelled, the labels.
"""

from __future__ import annotations

from typing import Any

import torch

from gpuworkers.compression import recovery
from gpuworkers.compression.context import CompressionError, Work
from gpuworkers.compression.prune import keep_layers


def spaced_layers(layers: int, count: int) -> list[int]:
    """`count` evenly spaced indices of `layers`, the first and the last included."""
    if count == 1:
        return [0]
    return sorted({round(i * (layers - 1) / (count - 1)) for i in range(count)})


def student_from_teacher(teacher: Any, count: int) -> tuple[Any, list[int]]:
    """The teacher cut to `count` of its layers, and which layers they are."""
    layers = int(teacher.config.num_hidden_layers)
    if not 1 <= count < layers:
        raise CompressionError(
            "invalid_options",
            f"student_layers must be between 1 and {layers - 1} (the teacher has {layers} "
            f"layers), got {count}",
            param="student_layers",
        )
    keep = spaced_layers(layers, count)
    return keep_layers(teacher, keep), keep


def _check_student(work: Work, teacher: Any, student: Any, tokenizer: Any, theirs: Any) -> None:
    if theirs.get_vocab() != tokenizer.get_vocab():
        raise CompressionError(
            "incompatible_student",
            "the student model has another tokenizer than the source; distillation needs "
            "the same vocabulary",
            param="student",
        )
    if recovery.parameter_count(student) >= recovery.parameter_count(teacher):
        raise CompressionError(
            "invalid_options",
            "the student is not smaller than the source: choose a smaller student model",
            param="student_layers",
        )
    if work.task == "embeddings" and student.config.hidden_size != teacher.config.hidden_size:
        raise CompressionError(
            "incompatible_student",
            f"the student's embeddings have {student.config.hidden_size} dimensions, the "
            f"source's {teacher.config.hidden_size}; they must match",
            param="student",
        )


def distill(work: Work) -> None:
    options = work.options
    requested = options.get("student_layers")
    if requested is not None and (isinstance(requested, bool) or not isinstance(requested, int)):
        raise recovery.bad_option(
            "student_layers", f"student_layers must be an integer, got {requested!r}"
        )
    schedule = recovery.Schedule(
        steps=recovery.option_int(options, "steps", 200, minimum=1),
        learning_rate=recovery.option_float(options, "learning_rate", 5e-4, low=0.0, high=1.0),
        batch_size=recovery.option_int(options, "batch_size", 8, minimum=1),
        max_seq_len=recovery.option_int(options, "max_seq_len", 128, minimum=2),
        temperature=recovery.option_float(options, "temperature", 2.0, low=0.0, high=100.0),
        alpha=recovery.option_float(options, "alpha", 0.5, low=0.0, high=1.0, low_open=False),
    )
    rows = recovery.option_int(options, "generated_rows", 64, minimum=1)
    torch.manual_seed(work.seed)
    tokenizer = recovery.load_tokenizer(work.source_dir)
    teacher = recovery.load_model(work, work.source_dir, tokenizer)
    teacher_layers = int(teacher.config.num_hidden_layers)
    notes: dict[str, Any] = {"teacher_layers": teacher_layers}
    keep: list[int] | None = None
    if work.student_dir is not None:
        student_tokenizer = recovery.load_tokenizer(work.student_dir)
        student = recovery.load_model(work, work.student_dir, student_tokenizer)
        _check_student(work, teacher, student, tokenizer, student_tokenizer)
        notes["student"] = "chosen model"
    else:
        count = requested if requested is not None else max(1, teacher_layers // 2)
        student, keep = student_from_teacher(teacher, count)
        notes["student"] = "teacher layers"
        notes["layers_from_teacher"] = keep
    notes["student_layers"] = int(student.config.num_hidden_layers)
    texts, labels = list(work.train_texts), list(work.train_labels)
    if not texts and work.task == "causal_lm":
        texts = recovery.generate_texts(
            teacher,
            tokenizer,
            rows=rows,
            max_new_tokens=min(64, schedule.max_seq_len),
            seed=work.seed,
        )
        notes["training_texts"] = {"generated_by_teacher": len(texts)}
    if not texts:
        raise CompressionError(
            "training_data_required",
            "distilling an embedding model or a classifier needs training rows",
        )
    losses = recovery.train(
        student,
        teacher,
        work,
        tokenizer=tokenizer,
        texts=texts,
        labels=labels if work.task == "classification" else (),
        schedule=schedule,
        pooling=recovery.pooling_of(work.source_dir),
        layer_map=keep,
    )
    notes["parameters"] = {
        "teacher": recovery.parameter_count(teacher),
        "student": recovery.parameter_count(student),
    }
    notes["distillation"] = {
        "steps": schedule.steps,
        "loss_first": round(losses[0], 6),
        "loss_last": round(losses[-1], 6),
    }
    work.notes.update(notes)
    recovery.save_result(student, work, tokenizer_dir=work.student_dir)
