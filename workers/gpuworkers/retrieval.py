"""Quality of embedding models: how close two sets of unit vectors are, and how well one
retrieves the other.

Both compression (a student against its teacher on the same texts) and evaluations (an
embedding model on query/positive pairs) score embeddings the same way:

- `mean_cosine(a, b)`: the mean of each row's cosine to the same row of the other set.
- `recall_at_k(queries, keys, ks)`: for each query row i, whether key row i is among the
  k keys most similar to it (ties broken by the lower index, so the result is
  deterministic); the share of queries for which it is, for each k. With k at least the
  number of keys every recall is 1.0.

Rows must be L2-normalised (the pooling in `compression.measure.embed` makes them so):
the dot product is then the cosine.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

#: The k's reported by default (MTEB's retrieval tasks report these among others).
DEFAULT_KS: tuple[int, ...] = (1, 5, 10)


def mean_cosine(a: torch.Tensor, b: torch.Tensor) -> float | None:
    """Mean row-wise cosine of two (N, d) unit-vector sets; None when their shapes differ
    (a student of another width embeds in another space)."""
    if a.shape != b.shape or a.shape[0] == 0:
        return None
    return round(float((a.float() * b.float().to(a.device)).sum(dim=-1).mean()), 6)


def recall_at_k(
    queries: torch.Tensor, keys: torch.Tensor, ks: Sequence[int] = DEFAULT_KS
) -> dict[int, float]:
    """{k: share of queries whose own key (same row index) is in their top k}."""
    if queries.shape[0] != keys.shape[0]:
        raise ValueError("queries and keys must have as many rows")
    if queries.shape[-1] != keys.shape[-1]:
        raise ValueError("queries and keys must have the same width")
    n = queries.shape[0]
    if n == 0:
        return dict.fromkeys(ks, 0.0)
    scores = queries.float() @ keys.float().to(queries.device).T  # (n, n)
    own = scores.diagonal().unsqueeze(1)
    index = torch.arange(n, device=scores.device)
    # A key ranks ahead of the query's own key when it scores higher, or as high with a
    # lower index: the own key's rank is how many keys do.
    ahead = (scores > own) | ((scores == own) & (index.unsqueeze(0) < index.unsqueeze(1)))
    rank = ahead.sum(dim=1)  # 0 = the own key is first
    return {k: round(float((rank < k).float().mean()), 6) for k in ks}
