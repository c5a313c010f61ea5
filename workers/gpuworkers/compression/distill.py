"""Knowledge distillation: train a smaller student to do what the source (the teacher) does.

The student is the teacher cut to `student_layers` of its layers (the first and the last
always among them), which starts far closer to the teacher than a fresh model; or, when
the job names one, a chosen smaller model of the same tokenizer (`student_layers` is then
not used). Which layers: dropped one at a time, each time the middle layer without which
the teacher's last hidden states change least on the training rows (token cosine), the
way layer-pruning work (ShortGPT and others) finds the layers a model needs least; evenly
spaced layers when there is nothing to choose on.

Objectives (see `recovery.objective`): a causal LM learns the teacher's token
distributions at temperature T (KL x T^2, weight alpha) and the text itself (CE, weight
1 - alpha), on the training rows or, with none, on texts sampled from the teacher; an
embedding model learns the teacher's pooled, normalised sentence embeddings; a classifier
the teacher's logits and, where rows are labelled, the labels.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from gpuworkers.compression import recovery
from gpuworkers.compression.context import CompressionError, Work
from gpuworkers.compression.prune import keep_layers, only_layers

#: The student's layers are chosen on at most this many training rows.
SELECTION_ROWS = 64


def spaced_layers(layers: int, count: int) -> list[int]:
    """`count` evenly spaced indices of `layers`, the first and the last included."""
    if count == 1:
        return [0]
    return sorted({round(i * (layers - 1) / (count - 1)) for i in range(count)})


def _last_hidden(model: Any, batch: recovery.Batch) -> torch.Tensor:
    out = model.base_model(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
    )
    hidden: torch.Tensor = out.last_hidden_state
    return hidden.float()


def chosen_layers(
    teacher: Any, batches: list[recovery.Batch], count: int
) -> tuple[list[int], float]:
    """The `count` layers to keep (see the module's docstring), and the token cosine of
    the teacher cut to them to the teacher itself, over `batches`."""
    with torch.no_grad():
        targets = [_last_hidden(teacher, batch) for batch in batches]

    def similarity(keep: list[int]) -> float:
        total = tokens = 0.0
        with torch.no_grad(), only_layers(teacher, keep):
            for batch, target in zip(batches, targets, strict=True):
                cosine = F.cosine_similarity(_last_hidden(teacher, batch), target, dim=-1)
                mask = batch.attention_mask.to(cosine.dtype)
                total += float((cosine * mask).sum())
                tokens += float(mask.sum())
        return total / max(tokens, 1.0)

    keep = list(range(int(teacher.config.num_hidden_layers)))
    best = 1.0
    while len(keep) > count:
        tried = [(similarity([k for k in keep if k != drop]), drop) for drop in keep[1:-1]]
        best, drop = max(tried)
        keep.remove(drop)
    return keep, best


def _check_count(teacher: Any, count: int) -> int:
    """The teacher's layer count, once `count` is known to be fewer."""
    layers = int(teacher.config.num_hidden_layers)
    if not 1 <= count < layers:
        raise CompressionError(
            "invalid_options",
            f"student_layers must be between 1 and {layers - 1} (the teacher has {layers} "
            f"layers), got {count}",
            param="student_layers",
        )
    return layers


def student_from_teacher(
    teacher: Any, count: int, batches: list[recovery.Batch] | None = None
) -> tuple[Any, list[int]]:
    """The teacher cut to `count` of its layers, and which layers they are: chosen on
    `batches` when given and there is a choice, else evenly spaced."""
    layers = _check_count(teacher, count)
    if batches and count >= 2:
        keep, _ = chosen_layers(teacher, batches, count)
    else:
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
    count = requested if requested is not None else max(1, teacher_layers // 2)
    student: Any = None
    if work.student_dir is not None:
        student_tokenizer = recovery.load_tokenizer(work.student_dir)
        student = recovery.load_model(work, work.student_dir, student_tokenizer)
        _check_student(work, teacher, student, tokenizer, student_tokenizer)
        notes["student"] = "chosen model"
    else:
        _check_count(teacher, count)  # before any work
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
    if student is None:
        choosing = recovery.make_batches(
            tokenizer,
            texts[:SELECTION_ROWS],
            batch_size=schedule.batch_size,
            max_len=schedule.max_seq_len,
            device=work.device,
            seed=work.seed,
        )
        student, keep = student_from_teacher(teacher, count, choosing)
        notes["student"] = "teacher layers"
        notes["layers_from_teacher"] = keep
        notes["layer_selection"] = {
            "method": "greedy_last_hidden_cosine" if count >= 2 else "first",
            "rows": min(len(texts), SELECTION_ROWS),
        }
    notes["student_layers"] = int(student.config.num_hidden_layers)
    trained = recovery.train(
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
        "loss_first": round(trained.losses[0], 6),
        "loss_last": round(trained.losses[-1], 6),
        "tokens": trained.tokens,
    }
    # Every step's batch was trained on (teacher-generated rows too: nobody's, but trained).
    notes["trained_tokens"] = trained.tokens
    work.notes.update(notes)
    recovery.save_result(student, work, tokenizer_dir=work.student_dir)
