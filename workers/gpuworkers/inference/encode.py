"""One forward over many texts: embeddings (pooled, normalised) and class probabilities.

Pooling follows the model directory's sentence-transformers configuration
(`modules.json`, `1_Pooling/config.json`): mean over the attention mask by
default, then L2 normalisation when a Normalize module is listed. A causal LM
asked for embeddings gives the mean of its last hidden state, normalised.
"""

from __future__ import annotations

import torch

from gpuworkers.inference.models import CAUSAL, CLASSIFIER, Loaded


def _inputs(loaded: Loaded, ids: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(i) for i in ids)
    pad = loaded.pad_id
    input_ids = torch.tensor([i + [pad] * (width - len(i)) for i in ids], device=loaded.device)
    mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i in ids], device=loaded.device)
    return input_ids, mask


def _route(loaded: Loaded, names: list[str]) -> None:
    if loaded.router is not None:
        loaded.router.names = names


def embed(loaded: Loaded, ids: list[list[int]], names: list[str]) -> torch.Tensor:
    """(N, hidden) float32 sentence embeddings of right-padded inputs."""
    input_ids, mask = _inputs(loaded, ids)
    _route(loaded, names)
    if loaded.key.kind == CAUSAL:
        out = loaded.model(
            input_ids=input_ids, attention_mask=mask, output_hidden_states=True, logits_to_keep=1
        )
        last: torch.Tensor = out.hidden_states[-1]
    else:
        last = loaded.model(input_ids=input_ids, attention_mask=mask).last_hidden_state
    hidden = last.float()
    weights = mask[..., None].to(hidden.dtype)
    if loaded.pooling == "cls":
        pooled = hidden[:, 0]
    elif loaded.pooling == "max":
        pooled = hidden.masked_fill(weights == 0, float("-inf")).max(dim=1).values
    elif loaded.pooling == "last":
        ends = mask.sum(dim=1) - 1
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), ends]
    else:
        pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)
    if loaded.normalize:
        pooled = torch.nn.functional.normalize(pooled, p=2, dim=-1)
    return pooled


def truncate(vectors: torch.Tensor, dimensions: int | None) -> torch.Tensor:
    """The first `dimensions` components, re-normalised to unit length."""
    if not dimensions or dimensions >= vectors.shape[-1]:
        return vectors
    return torch.nn.functional.normalize(vectors[:, :dimensions], p=2, dim=-1)


def classify(loaded: Loaded, ids: list[list[int]], names: list[str]) -> torch.Tensor:
    """(N, labels) class probabilities."""
    assert loaded.key.kind == CLASSIFIER
    input_ids, mask = _inputs(loaded, ids)
    _route(loaded, names)
    logits = loaded.model(input_ids=input_ids, attention_mask=mask).logits
    return torch.softmax(logits.float(), dim=-1)
