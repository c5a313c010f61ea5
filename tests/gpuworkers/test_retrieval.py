"""Embedding quality measures shared by compression and evaluations."""

import pytest
import torch

from gpuworkers.retrieval import mean_cosine, recall_at_k


def _unit(rows: list[list[float]]) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.tensor(rows, dtype=torch.float32), dim=-1)


def test_recall_counts_the_own_key_rank() -> None:
    keys = _unit([[1, 0, 0], [0, 1, 0], [0, 0, 1]])
    # Query 0 is nearest key 0; query 1 nearest key 2 (own key second); query 2 nearest
    # key 0, then 1, own key last.
    queries = _unit([[1, 0.1, 0], [0, 0.6, 0.8], [0.9, 0.4, 0.1]])
    assert recall_at_k(queries, keys, (1, 2, 3)) == {
        1: pytest.approx(1 / 3),
        2: pytest.approx(2 / 3),
        3: 1.0,
    }


def test_ties_go_to_the_lower_index() -> None:
    keys = _unit([[1, 0], [1, 0]])
    queries = _unit([[1, 0], [1, 0]])
    # Query 0's own key wins the tie (lower index); query 1's loses it.
    assert recall_at_k(queries, keys, (1, 2)) == {1: 0.5, 2: 1.0}


def test_mean_cosine() -> None:
    a = _unit([[1, 0], [0, 1]])
    b = _unit([[1, 0], [1, 1]])
    assert mean_cosine(a, b) == pytest.approx((1 + 2**-0.5) / 2, abs=1e-6)
    assert mean_cosine(a, _unit([[1, 0, 0], [0, 1, 0]])) is None


def test_shape_errors() -> None:
    with pytest.raises(ValueError, match="as many rows"):
        recall_at_k(_unit([[1, 0]]), _unit([[1, 0], [0, 1]]))
    with pytest.raises(ValueError, match="width"):
        recall_at_k(_unit([[1, 0]]), _unit([[1, 0, 0]]))
