"""Losses as sums over a batch (the caller divides by the global count, so a batch
split across ranks gets exactly the gradient of the whole batch on one device).

- causal LM: cross-entropy of each learned token given the tokens before it;
- classification: cross-entropy of each row's label;
- DPO (Rafailov et al. 2023), per pair: -logsigmoid(beta * ((logp(chosen) - logp(rejected))
  - (ref_logp(chosen) - ref_logp(rejected)))), log-probabilities summed over the response
  tokens; the reference is the frozen base model (under LoRA: the same model, adapter off).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from gpuworkers.training.data import IGNORE


@dataclass
class Sums:
    loss: torch.Tensor  # summed over units, differentiable
    count: float  # units: learned tokens (causal LM) or rows (classification, DPO pairs)
    correct: float  # argmax hits (tokens, rows) or pairs the policy prefers correctly
    tokens: int  # non-padding tokens in the batch
    #: Classification: each row's predicted class id (for per-class scores such as F1).
    predicted: torch.Tensor | None = None


def compute(
    kind: str, model: Any, batch: dict[str, torch.Tensor], *, reference: Any, beta: float
) -> Sums:
    tokens = int(batch["attention_mask"].sum())
    if kind == "classification":
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"]
        loss = F.cross_entropy(logits.float(), labels, reduction="sum")
        predicted = logits.argmax(-1)
        correct = float((predicted == labels).sum())
        return Sums(loss, float(labels.numel()), correct, tokens, predicted=predicted)
    if kind == "preference":
        return _dpo(model, batch, reference=reference, beta=beta, tokens=tokens)
    labels = batch["labels"][:, 1:]
    learned = labels != IGNORE
    if getattr(_unwrap(model), SELECTS_LOGITS, False):
        # Logits of the positions whose next token is learned only, in row-major order
        # (as `labels[learned]`): the vocabulary projection skips prompts and padding.
        select = F.pad(learned, (0, 1))
        logits = _logits(model, batch, select=select).float()
        targets = labels[learned]
        loss = F.cross_entropy(logits, targets, reduction="sum")
        correct = float((logits.argmax(-1) == targets).sum())
        return Sums(loss, float(targets.numel()), correct, tokens)
    logits = _logits(model, batch)[:, :-1].float()
    loss = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)),
        labels.reshape(-1),
        ignore_index=IGNORE,
        reduction="sum",
    )
    correct = float(((logits.argmax(-1) == labels) & learned).sum())
    return Sums(loss, float(learned.sum()), correct, tokens)


#: Set on a causal LM that `select_logits` patched.
SELECTS_LOGITS = "_atelier_selects_logits"


def select_logits(model: Any) -> bool:
    """Let `model(..., select=mask)` return the logits of the positions `mask` (batch,
    length) selects only, flat, without the (batch, length, vocabulary) tensor: the
    backbone, then the output projection of the selected hidden states. Patched on the
    transformers model before PEFT wraps it (PEFT passes the keyword through), so that
    DDP still runs its own forward. Models whose logits are more than the projection
    (soft-capped, scaled) are left alone; returns whether it patched."""
    config = model.config.get_text_config()
    extra = (
        "final_logit_softcapping",
        "logit_scale",
        "output_multiplier",
        "logits_scaling",
        "lm_head_multiplier",
    )
    prefix = getattr(model, "base_model_prefix", "")
    if (
        any(getattr(config, name, None) is not None for name in extra)
        or not prefix
        or not hasattr(model, prefix)
        or model.get_output_embeddings() is None
    ):
        return False
    original = model.forward

    def forward(*args: Any, select: torch.Tensor | None = None, **kwargs: Any) -> Any:
        if select is None:
            return original(*args, **kwargs)
        kwargs.pop("labels", None)
        hidden = getattr(model, prefix)(*args, **kwargs).last_hidden_state
        return _Selected(model.get_output_embeddings()(hidden[select]))

    model.forward = forward
    setattr(model, SELECTS_LOGITS, True)
    return True


@dataclass
class _Selected:
    logits: torch.Tensor


def _unwrap(model: Any) -> Any:
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def _logits(
    model: Any, batch: dict[str, torch.Tensor], select: torch.Tensor | None = None
) -> torch.Tensor:
    """A causal LM's logits, without the padding mask: the rows are right-padded, so
    under the causal mask no real token ever sees a pad (its positions are 0, 1, … as
    with the mask), and pads are learned by nothing. Attention then runs its causal
    kernel (`is_causal`, half the blocks) instead of a masked one, and no 4D mask is
    built: the same loss and gradients, faster. Packed rows
    (`TokenizedSet.collate_packed`) carry `position_ids`, which restart at each row; from
    those transformers builds the block-diagonal mask (or flash attention's varlen
    boundaries). With `select` (a model `select_logits` patched): the selected positions'
    logits only, flat."""
    kwargs: dict[str, Any] = {"select": select} if select is not None else {}
    if "position_ids" in batch:
        kwargs["position_ids"] = batch["position_ids"]
    out = model(input_ids=batch["input_ids"], use_cache=False, **kwargs)
    logits: torch.Tensor = out.logits
    return logits


def sequence_logps(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum of log p(token | prefix) over each sequence's learned tokens."""
    logits = _logits(model, batch)[:, :-1].float()
    labels = batch["labels"][:, 1:]
    learned = labels != IGNORE
    index = labels.clamp(min=0).unsqueeze(-1)
    token_logps = logits.gather(-1, index).squeeze(-1) - logits.logsumexp(-1)
    return (token_logps * learned).sum(-1)


def _dpo(
    model: Any, batch: dict[str, torch.Tensor], *, reference: Any, beta: float, tokens: int
) -> Sums:
    with torch.no_grad():
        if reference is not None:
            ref = sequence_logps(reference, batch)
        else:
            ref = sequence_logps_without_adapter(model, batch)
    policy = sequence_logps(model, batch)
    pairs = policy.size(0) // 2
    margin = (policy[:pairs] - policy[pairs:]) - (ref[:pairs] - ref[pairs:])
    logits = beta * margin
    loss = -F.logsigmoid(logits).sum()
    return Sums(loss, float(pairs), float((logits > 0).sum()), tokens)


def sequence_logps_without_adapter(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    base = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    context = (
        base.disable_adapter() if hasattr(base, "disable_adapter") else contextlib.nullcontext()
    )
    with context:
        return sequence_logps(base, batch)


def metrics(
    kind: str,
    *,
    loss: float,
    count: float,
    correct: float,
    prefix: str = "valid",
    confusion: Sequence[float] = (),
) -> dict[str, float]:
    """Evaluation metrics from global sums (names as in the report contract), each named
    `{prefix}_…`. `confusion` (classification): per class, its true positives, false
    positives and false negatives, flat ([tp0, fp0, fn0, tp1, …]), for the macro-F1."""
    count = max(count, 1.0)
    mean = loss / count
    if kind == "classification":
        out = {f"{prefix}_loss": mean, f"{prefix}_accuracy": correct / count}
        if confusion:
            out[f"{prefix}_macro_f1"] = macro_f1(confusion)
        return out
    if kind == "preference":
        return {f"{prefix}_loss": mean, f"{prefix}_reward_accuracy": correct / count}
    return {
        f"{prefix}_loss": mean,
        f"{prefix}_mean_token_accuracy": correct / count,
        # Per learned token; past e^700 a float overflows, and the model is useless anyway.
        f"{prefix}_perplexity": math.exp(min(mean, 700.0)),
    }


def confusion_counts(predicted: torch.Tensor, labels: torch.Tensor, classes: int) -> list[float]:
    """[tp0, fp0, fn0, tp1, fp1, fn1, …] of one batch (summable across batches and ranks)."""
    out: list[float] = []
    for c in range(classes):
        pred, true = predicted == c, labels == c
        tp, fp, fn = (pred & true).sum(), (pred & ~true).sum(), (~pred & true).sum()
        out += [float(tp), float(fp), float(fn)]
    return out


def macro_f1(confusion: Sequence[float]) -> float:
    """Unweighted mean of the classes' F1 = 2tp / (2tp + fp + fn), over the classes that
    occur in the labels or the predictions (as scikit-learn's `f1_score(average="macro")`)."""
    scores = []
    for i in range(0, len(confusion), 3):
        tp, fp, fn = confusion[i : i + 3]
        if 2 * tp + fp + fn > 0:
            scores.append(2 * tp / (2 * tp + fp + fn))
    return sum(scores) / len(scores) if scores else 0.0
