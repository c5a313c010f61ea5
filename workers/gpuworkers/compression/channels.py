"""MLP channels chosen and compensated as in OBS / SparseGPT, per structure.

For one layer (its inputs from the layers already pruned), the second moments of the down
projection's inputs over the calibration rows (`channel_moments`) give, through their
inverse, the cost of removing each channel with the remaining weights refit by least
squares to make up for it (optimal brain surgeon); `obs_select` removes the cheapest a few
at a time, refitting after each round, and `compensate` writes the refit weights (and the
bias, which absorbs the mean of what changed) back into the layer. A post-norm family
(BERT) weighs each token and output dimension as the LayerNorm after the MLP will, so the
error minimised is the one the next layer sees.

Measured on all-MiniLM-L6-v2 at 30% (45% of the MLP channels), before any recovery, mean
cosine to the source's embeddings on 256 held-out sentences: 0.899 keeping the channels of
largest activation x weight with the mean folded into the bias (the previous method),
0.963 refitting those by least squares, 0.968 choosing them by OBS, 0.970 with the
LayerNorm's weighting and the layers in sequence.
"""

from __future__ import annotations

from contextlib import suppress
from dataclasses import dataclass
from typing import Any

import torch

from gpuworkers.compression import recovery
from gpuworkers.compression.context import CompressionError

#: The channel statistics are gathered over at most this many of the job's rows.
CALIBRATION_ROWS = 1024
#: Ridge added to the inputs' covariance, relative to its mean diagonal, before inverting.
DAMPING = 1e-3
#: Channels are removed in at most this many rounds (a few at a time, the inverse updated
#: after each round): one at a time is no better here and far slower.
ROUNDS = 64


class _Reached(Exception):
    """Raised by a hook once the layer being pruned has seen its inputs: the rest of the
    forward is not needed."""


@dataclass
class Moments:
    """Weighted moments of a down projection's inputs x (one row per real token)."""

    weight: float
    mean: torch.Tensor  # (channels,) float64
    second: torch.Tensor  # (channels, channels): E[x x^T], float64

    def hessian(self, centred: bool) -> torch.Tensor:
        """The inputs' covariance (with a bias to absorb the mean) or second moment."""
        second = self.second
        if centred:
            second = second - torch.outer(self.mean, self.mean)
        damp = DAMPING * float(second.diagonal().mean().clamp(min=1e-12))
        return second + damp * torch.eye(second.shape[0], dtype=second.dtype, device=second.device)


def _weight_matrix(module: Any, axis: int) -> torch.Tensor:
    """(outputs, channels) float64: a Linear's weight, or a Conv1D's (in, out) transposed."""
    weight: torch.Tensor = module.weight.detach().to(torch.float64)
    return weight if axis == 1 else weight.T


def channel_moments(
    model: Any, down: Any, norm: Any | None, batches: list[recovery.Batch]
) -> Moments:
    """Moments of the inputs of `down` (a layer's down projection) over `batches`, each
    forward of `model` stopped there. With `norm` (the LayerNorm after a post-norm MLP)
    each token is weighed by 1 / the variance of the norm's input: that norm divides the
    token's error by its spread."""
    sums: dict[str, Any] = {"w": 0.0, "x": None, "xx": None}
    held: dict[str, torch.Tensor] = {}

    def add(x: torch.Tensor, w: torch.Tensor) -> None:
        # A batch's sums in float32 (fast), added up over batches in float64.
        weighted = x * w[:, None]
        sums["w"] += float(w.sum())
        sums["x"] = weighted.sum(dim=0).double() + (0 if sums["x"] is None else sums["x"])
        sums["xx"] = (weighted.T @ x).double() + (0 if sums["xx"] is None else sums["xx"])

    def on_down(_: Any, args: tuple[Any, ...]) -> None:
        x = args[0].detach()[held["mask"]].float()
        if norm is None:
            add(x, torch.ones(x.shape[0], dtype=x.dtype, device=x.device))
            raise _Reached
        held["x"] = x

    def on_norm(_: Any, args: tuple[Any, ...]) -> None:
        z = args[0].detach()[held["mask"]].float()
        add(held["x"], 1.0 / z.var(dim=-1, unbiased=False).clamp(min=1e-6))
        raise _Reached

    handles = [down.register_forward_pre_hook(on_down)]
    if norm is not None:
        handles.append(norm.register_forward_pre_hook(on_norm))
    try:
        with torch.no_grad():
            for batch in batches:
                held["mask"] = batch.attention_mask.bool()
                with suppress(_Reached):
                    model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    finally:
        for handle in handles:
            handle.remove()
    if sums["x"] is None or sums["w"] <= 0:
        raise CompressionError("training_data_required", "no texts to score the model on")
    total = float(sums["w"])
    return Moments(total, sums["x"] / total, sums["xx"] / total)


def obs_select(
    weight: torch.Tensor, hessian: torch.Tensor, kept: int, rows: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept channel indices, sorted; their new weights (outputs, kept)): the channels whose
    removal raises sum_o rows[o] * ||(W - W')[o] x||^2 over the inputs least, removed a
    round at a time, the remaining weights refit after each round (optimal brain
    surgeon: the error of removing channels J is W[:, J] [H^-1]_JJ^-1 W[:, J]^T, and the
    refit is W -= W[:, J] [H^-1]_JJ^-1 [H^-1]_J)."""
    channels = weight.shape[1]
    inverse = torch.linalg.inv(hessian)
    w = weight.clone()
    rows = torch.ones(w.shape[0], dtype=w.dtype, device=w.device) if rows is None else rows
    alive = torch.ones(channels, dtype=torch.bool, device=w.device)
    remove = channels - kept
    chunk = max(1, -(-remove // ROUNDS))
    while remove > 0:
        k = min(chunk, remove)
        cost = (rows[:, None] * w.square()).sum(dim=0) / inverse.diagonal()
        cost[~alive] = float("inf")
        gone = cost.topk(k, largest=False).indices
        block = torch.linalg.inv(inverse[gone][:, gone])
        w -= (w[:, gone] @ block) @ inverse[gone, :]
        inverse -= inverse[:, gone] @ block @ inverse[gone, :]
        alive[gone] = False
        w[:, gone] = 0
        inverse[gone, :] = 0
        inverse[:, gone] = 0
        inverse[gone, gone] = 1
        remove -= k
    keep = alive.nonzero()[:, 0]
    return keep, w[:, keep]


def compensate(
    model: Any,
    down: Any,
    axis: int,
    norm: Any | None,
    batches: list[recovery.Batch],
    kept: int,
) -> torch.Tensor:
    """Choose the `kept` input channels of `down` (a layer's down projection; `axis` the
    channel axis of its weight) and refit it to them, in place: the removed channels'
    weights become zero, so the next layer's statistics see this layer pruned; the caller
    cuts them (and their rows of the projections into the MLP) afterwards. The kept
    channels, sorted, on the CPU."""
    moments = channel_moments(model, down, norm, batches)
    has_bias = getattr(down, "bias", None) is not None
    weight = _weight_matrix(down, axis).to(moments.second.device)
    rows = None
    if norm is not None:  # the norm scales output dimension o of the error by its gain
        rows = norm.weight.detach().to(weight).square()
    keep, refit = obs_select(weight, moments.hessian(centred=has_bias), kept, rows)
    full = torch.zeros_like(weight)
    full[:, keep] = refit
    with torch.no_grad():
        if has_bias:
            # The mean of what changed moves into the bias: E[W x] - E[W' x_kept].
            shift = weight @ moments.mean - refit @ moments.mean[keep]
            down.bias.add_(shift.to(down.bias))
        down.weight.copy_((full if axis == 1 else full.T).to(down.weight))
    return keep.cpu()
