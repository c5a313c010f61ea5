"""What `prune` and `distill` share: loading and saving the model, reading their options,
and the short training loop that teaches a smaller student to match its teacher.

The loop trains on batches of tokenized `work.train_texts` with AdamW, a short warm-up then
cosine (or linear) decay and gradient clipping, and calls `work.step(i, total, loss)` after
every step; whatever that raises (Cancelled, StaleAttempt) stops training and propagates.
The objective follows the task: a causal LM or a classifier matches the teacher's logits
(KL at a temperature, times T^2) mixed with its own CE loss; an embedding model matches the
teacher's pooled sentence embeddings (MSE + 1 - cosine).
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
)
from transformers.utils import logging as transformers_logging

from gpuworkers import safeload
from gpuworkers.compression.context import CompressionError, Work

# Progress bars for loading and writing shards are noise in a worker's log.
transformers_logging.disable_progress_bar()  # type: ignore[no-untyped-call]

#: Tokenizer files a model directory may hold; copied from the source unchanged, so the
#: result tokenizes exactly as the source did.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "chat_template.jinja",
    "chat_template.json",
)
#: sentence-transformers files at the top of an embedding model's directory.
SENTENCE_TRANSFORMERS_FILES = (
    "modules.json",
    "sentence_bert_config.json",
    "config_sentence_transformers.json",
)
#: Calibration texts when a job brings no training rows (importance scores need inputs).
FALLBACK_TEXTS = (
    "The quick brown fox jumps over the lazy dog.",
    "Your order has shipped and will arrive on Monday.",
    "Please find the invoice attached to this message.",
    "The weather is sunny today, with a light breeze from the west.",
    "We are sorry for the delay; our team will call you back.",
    "How can I reset my password and update my billing plan?",
    "One two three four five six seven eight nine ten.",
    "The model learns from data and the customer owns the result.",
    "A cat sat on the mat and watched the birds outside.",
    "Refunds are processed within five business days.",
    "The meeting was moved to Thursday afternoon at three.",
    "Large language models are trained on a great deal of text.",
)


# -- options ------------------------------------------------------------------------------


def bad_option(name: str, message: str) -> CompressionError:
    return CompressionError("invalid_options", message, param=name)


def option_int(options: dict[str, Any], name: str, default: int, *, minimum: int) -> int:
    value = options.get(name, default)
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise bad_option(name, f"{name} must be an integer of at least {minimum}, got {value!r}")
    return value


def option_float(
    options: dict[str, Any],
    name: str,
    default: float | None,
    *,
    low: float,
    high: float | None = None,
    low_open: bool = True,
    high_open: bool = False,
) -> float:
    """A number in (low, high] by default; `default` None makes the option required."""
    value = options.get(name, default)
    if value is None:
        raise bad_option(name, f"{name} is required")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise bad_option(name, f"{name} must be a number, got {value!r}")
    number = float(value)
    too_low = number <= low if low_open else number < low
    too_high = high is not None and (number >= high if high_open else number > high)
    if too_low or too_high:
        left, right = "(" if low_open else "[", ")" if high_open else "]"
        span = f"{left}{low:g}, {high:g}{right}" if high is not None else f"above {low:g}"
        raise bad_option(name, f"{name} must be in {span}, got {value!r}")
    return number


# -- loading and saving -------------------------------------------------------------------


def load_tokenizer(folder: Path) -> Any:
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise CompressionError("unsupported_model", "the tokenizer has no pad or end token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(work: Work, folder: Path, tokenizer: Any) -> Any:
    """The model at `folder` as `work.task` uses it: float32, on the device, in eval mode."""
    try:
        safeload.require_safetensors(folder)
    except safeload.UnsafeWeights as error:
        raise CompressionError("unsafe_weights", str(error)) from None
    kwargs: dict[str, Any] = {"dtype": torch.float32, **safeload.pretrained_kwargs()}
    if work.task == "causal_lm":
        model_class: Any = AutoModelForCausalLM
    elif work.task == "classification":
        model_class = AutoModelForSequenceClassification
        if work.labels:
            kwargs.update(
                num_labels=len(work.labels),
                id2label=dict(enumerate(work.labels)),
                label2id={name: i for i, name in enumerate(work.labels)},
            )
        kwargs["pad_token_id"] = tokenizer.pad_token_id
    else:
        model_class = AutoModel
    model = model_class.from_pretrained(str(folder), **kwargs)
    model.to(work.device)
    model.eval()
    return model


def save_result(model: Any, work: Work, *, tokenizer_dir: Path | None = None) -> None:
    """`work.out_dir` as a complete model directory: config + safetensors, the tokenizer
    files of `tokenizer_dir` (the source's by default) and, for an embedding model, the
    source's sentence-transformers files (the result was trained to its pooling)."""
    out = work.out_dir
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    source = work.source_dir
    for name in TOKENIZER_FILES:
        if ((tokenizer_dir or source) / name).is_file():
            shutil.copyfile((tokenizer_dir or source) / name, out / name)
    for name in SENTENCE_TRANSFORMERS_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, out / name)
    modules = source / "modules.json"
    if modules.is_file():
        for module in json.loads(modules.read_text()):
            path = str(module.get("path", ""))
            folder = source / path
            if not path or not folder.is_dir():
                continue
            (out / path).mkdir(parents=True, exist_ok=True)
            # JSON only: a module folder could hold anything, and the artifact is
            # safetensors + JSON.
            for item in folder.glob("*.json"):
                shutil.copyfile(item, out / path / item.name)


def parameter_count(model: Any) -> int:
    # Tied tensors (embeddings and LM head) are one parameter, counted once.
    return sum(p.numel() for p in model.parameters())


# -- pooling ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pooling:
    mode: str = "mean"  # mean | cls | max | last
    normalize: bool = True


def pooling_of(folder: Path) -> Pooling:
    """Pooling as the directory's sentence-transformers modules say (mean + normalise
    without them), as the inference workers embed."""
    modules_path = folder / "modules.json"
    if not modules_path.is_file():
        return Pooling()
    modules = json.loads(modules_path.read_text())
    mode = "mean"
    for module in modules:
        if str(module.get("type", "")).endswith(".Pooling"):
            config_path = folder / str(module.get("path", "")) / "config.json"
            if config_path.is_file():
                options = json.loads(config_path.read_text())
                for key, name in (
                    ("pooling_mode_cls_token", "cls"),
                    ("pooling_mode_max_tokens", "max"),
                    ("pooling_mode_lasttoken", "last"),
                    ("pooling_mode_mean_tokens", "mean"),
                ):
                    if options.get(key):
                        mode = name
    normalize = any(str(m.get("type", "")).endswith(".Normalize") for m in modules)
    return Pooling(mode, normalize)


def pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: Pooling) -> torch.Tensor:
    hidden = hidden.float()
    weights = mask[..., None].to(hidden.dtype)
    if pooling.mode == "cls":
        pooled = hidden[:, 0]
    elif pooling.mode == "max":
        pooled = hidden.masked_fill(weights == 0, float("-inf")).max(dim=1).values
    elif pooling.mode == "last":
        ends = mask.sum(dim=1) - 1
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), ends]
    else:
        pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)
    return F.normalize(pooled, p=2, dim=-1) if pooling.normalize else pooled


# -- batches, outputs, objectives ---------------------------------------------------------


@dataclass
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor | None = None


def make_batches(
    tokenizer: Any,
    texts: Sequence[str],
    labels: Sequence[int] = (),
    *,
    batch_size: int,
    max_len: int,
    device: torch.device,
    seed: int = 0,
) -> list[Batch]:
    """One epoch of right-padded batches, in an order fixed by `seed`."""
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(seed)).tolist()
    batches = []
    for start in range(0, len(order), batch_size):
        chosen = order[start : start + batch_size]
        encoded = tokenizer(
            [texts[i] for i in chosen],
            padding=True,
            truncation=True,
            max_length=max_len,
            return_tensors="pt",
        )
        batch_labels = torch.tensor([labels[i] for i in chosen], device=device) if labels else None
        batches.append(
            Batch(
                encoded["input_ids"].to(device),
                encoded["attention_mask"].to(device),
                batch_labels,
            )
        )
    return batches


def outputs(model: Any, task: str, batch: Batch, pooling: Pooling) -> torch.Tensor:
    """Logits (causal LM, classifier) or pooled sentence embeddings (embeddings)."""
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    if task == "embeddings":
        return pool(out.last_hidden_state, batch.attention_mask, pooling)
    logits: torch.Tensor = out.logits
    return logits.float()


def _soft_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) at `temperature` per row, times T^2 (Hinton et al.), so its
    gradients keep their size as the temperature changes."""
    log_student = F.log_softmax(student / temperature, dim=-1)
    log_teacher = F.log_softmax(teacher / temperature, dim=-1)
    kl = (log_teacher.exp() * (log_teacher - log_student)).sum(dim=-1)
    return kl * temperature**2


def objective(
    task: str,
    student: torch.Tensor,
    teacher: torch.Tensor,
    batch: Batch,
    *,
    temperature: float,
    alpha: float,
) -> torch.Tensor:
    """alpha * soft loss + (1 - alpha) * hard loss; the hard loss is left out where there
    is nothing to learn it from (an embedding model, a classifier without labels)."""
    if task == "embeddings":
        cosine = F.cosine_similarity(student, teacher, dim=-1)
        return F.mse_loss(student, teacher) + (1 - cosine).mean()
    if student.shape[-1] != teacher.shape[-1]:
        # Vocabularies padded to different sizes: the tokenizer's ids are in both.
        width = min(student.shape[-1], teacher.shape[-1])
        student, teacher = student[..., :width], teacher[..., :width]
    if task == "causal_lm":
        mask = batch.attention_mask.float()
        soft = (_soft_kl(student, teacher, temperature) * mask).sum() / mask.sum().clamp(min=1)
        targets = batch.input_ids[:, 1:].masked_fill(batch.attention_mask[:, 1:] == 0, -100)
        if not bool((targets != -100).any()):
            return soft
        hard = F.cross_entropy(
            student[:, :-1].reshape(-1, student.shape[-1]),
            targets.reshape(-1),
            ignore_index=-100,
        )
        return alpha * soft + (1 - alpha) * hard
    soft = _soft_kl(student, teacher, temperature).mean()
    if batch.labels is None:
        return soft
    return alpha * soft + (1 - alpha) * F.cross_entropy(student, batch.labels)


def hidden_match(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """How far token hidden states (B, T, H) are from the teacher's, over real tokens:
    1 - cosine plus the squared error relative to the teacher's own size, so layers whose
    activations differ in scale weigh alike."""
    weights = mask.to(student.dtype)
    tokens = weights.sum().clamp(min=1)
    student, teacher = student.float(), teacher.float()
    cosine = 1 - F.cosine_similarity(student, teacher, dim=-1)
    error = (student - teacher).square().mean(dim=-1)
    scale = teacher.square().mean(dim=-1).clamp(min=1e-6)
    return ((cosine + error / scale) * weights).sum() / tokens


def layer_pairs(
    student: Any, teacher: Any, layer_map: Sequence[int] | None
) -> list[tuple[int, int]]:
    """(student, teacher) indices into `hidden_states` of the intermediate layers to match;
    the last layer is matched separately. Empty where the widths or layers do not line up."""
    mine = int(getattr(student.config, "num_hidden_layers", 0) or 0)
    theirs = int(getattr(teacher.config, "num_hidden_layers", 0) or 0)
    if getattr(student.config, "hidden_size", None) != getattr(teacher.config, "hidden_size", 0):
        return []
    if layer_map is None:
        layer_map = list(range(mine)) if mine == theirs else []
    if len(layer_map) != mine or any(not 0 <= t < theirs for t in layer_map):
        return []
    return [(i + 1, int(t) + 1) for i, t in enumerate(layer_map[:-1])]


def _embedding_loss(
    student: Any,
    teacher: Any,
    batch: Batch,
    pooling: Pooling,
    pairs: Sequence[tuple[int, int]],
) -> torch.Tensor:
    """The pooled embedding's loss (`objective`) plus the token hidden states of the last
    layer and, averaged, of the intermediate layers in `pairs` (TinyBERT / MiniLM style):
    the pooled vector alone is one number per sentence to learn from; the tokens give the
    student far more signal per step."""
    inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
    with torch.no_grad():
        theirs = teacher(**inputs, output_hidden_states=bool(pairs))
    mine = student(**inputs, output_hidden_states=bool(pairs))
    mask = batch.attention_mask
    pooled = objective(
        "embeddings",
        pool(mine.last_hidden_state, mask, pooling),
        pool(theirs.last_hidden_state, mask, pooling),
        batch,
        temperature=1.0,
        alpha=1.0,
    )
    loss = pooled + hidden_match(mine.last_hidden_state, theirs.last_hidden_state, mask)
    if pairs:
        layers = [
            hidden_match(mine.hidden_states[s], theirs.hidden_states[t], mask) for s, t in pairs
        ]
        loss = loss + torch.stack(layers).mean()
    return loss


# -- the loop -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Schedule:
    steps: int
    learning_rate: float
    batch_size: int = 8
    max_seq_len: int = 128
    temperature: float = 2.0
    alpha: float = 0.5
    decay: str = "cosine"  # cosine | linear
    clip: float = 1.0
    weight_decay: float = 0.01


@dataclass(frozen=True)
class Trained:
    #: The loss of each step.
    losses: list[float]
    #: Real (non-padding) tokens of every batch trained on, counted as fine-tuning counts
    #: them: what a data partner whose rows these are is credited for.
    tokens: int


def _lr_factor(step: int, schedule: Schedule) -> float:
    warmup = max(1, schedule.steps // 10)
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, schedule.steps - warmup)
    if schedule.decay == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def train(
    student: Any,
    teacher: Any,
    work: Work,
    *,
    tokenizer: Any,
    texts: Sequence[str],
    labels: Sequence[int] = (),
    schedule: Schedule,
    pooling: Pooling | None = None,
    layer_map: Sequence[int] | None = None,
) -> Trained:
    """Train `student` toward `teacher` for `schedule.steps` steps; the loss of each step
    and the tokens trained on.

    `layer_map[i]` is the teacher layer that student layer i stands for (the identity when
    both have as many layers, e.g. after pruning heads and channels); an embedding model
    then also matches those layers' token hidden states (see `hidden_match`).

    The student trains with dropout off: recovery is short and its targets are the
    teacher's deterministic outputs, so dropout noise only slows it down.
    """
    if schedule.steps <= 0:
        return Trained([], 0)
    if not texts:
        raise CompressionError(
            "training_data_required", f"{work.method} needs training rows to train on"
        )
    if labels and len(labels) != len(texts):
        raise CompressionError(
            "invalid_training_data",
            f"{len(texts)} training rows but {len(labels)} labels",
        )
    pooling = pooling or Pooling()
    teacher.eval()
    teacher.requires_grad_(False)
    student.eval()
    student.requires_grad_(True)
    parameters = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        parameters, lr=schedule.learning_rate, weight_decay=schedule.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: _lr_factor(step, schedule)
    )
    autocast = work.device.type == "cuda" and torch.cuda.is_bf16_supported()
    pairs = layer_pairs(student, teacher, layer_map)
    losses: list[float] = []
    tokens = 0
    epoch = 0
    batches: list[Batch] = []
    for step in range(schedule.steps):
        if not batches:
            batches = make_batches(
                tokenizer,
                texts,
                labels,
                batch_size=schedule.batch_size,
                max_len=schedule.max_seq_len,
                device=work.device,
                seed=work.seed + epoch,
            )
            epoch += 1
        batch = batches.pop(0)
        with torch.autocast(work.device.type, dtype=torch.bfloat16, enabled=autocast):
            if work.task == "embeddings":
                loss = _embedding_loss(student, teacher, batch, pooling, pairs)
            else:
                with torch.no_grad():
                    target = outputs(teacher, work.task, batch, pooling)
                predicted = outputs(student, work.task, batch, pooling)
                loss = objective(
                    work.task,
                    predicted,
                    target,
                    batch,
                    temperature=schedule.temperature,
                    alpha=schedule.alpha,
                )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        torch.nn.utils.clip_grad_norm_(parameters, schedule.clip)
        optimizer.step()
        scheduler.step()
        value = float(loss.detach())
        if not math.isfinite(value):
            raise CompressionError(
                "training_diverged",
                f"the loss became {value} at step {step + 1}: lower the learning rate",
                param="learning_rate",
            )
        losses.append(value)
        tokens += int(batch.attention_mask.sum())
        work.step(step + 1, schedule.steps, value)
    student.requires_grad_(False)
    student.eval()
    return Trained(losses, tokens)


def generate_texts(
    teacher: Any, tokenizer: Any, *, rows: int, max_new_tokens: int, seed: int
) -> list[str]:
    """`rows` texts sampled from a causal LM teacher (fixed seed), for distilling or
    recovering without training rows. Prompts are the BOS token, or BOS plus one of a few
    common words, so the rows start differently."""
    device = next(teacher.parameters()).device
    bos = tokenizer.bos_token_id
    starts: list[list[int]] = [[bos]] if bos is not None else []
    for word in ("The", "A", "In", "It", "We", "This", "When", "I"):
        ids = tokenizer.encode(word, add_special_tokens=False)[:1]
        if ids:
            starts.append(([bos] if bos is not None else []) + ids)
    if not starts:
        raise CompressionError("unsupported_model", "the tokenizer can not make a prompt")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    texts: list[str] = []
    try:
        per_prompt = math.ceil(rows / len(starts))
        for prompt in starts:
            if len(texts) >= rows:
                break
            count = min(per_prompt, rows - len(texts))
            input_ids = torch.tensor([prompt] * count, device=device)
            with torch.no_grad():
                sequences = teacher.generate(
                    input_ids=input_ids,
                    attention_mask=torch.ones_like(input_ids),
                    do_sample=True,
                    top_k=50,
                    max_new_tokens=max_new_tokens,
                    pad_token_id=pad,
                )
            texts.extend(tokenizer.batch_decode(sequences, skip_special_tokens=True))
    finally:
        torch.random.set_rng_state(generator_state)
    return [text for text in texts if text.strip()]
