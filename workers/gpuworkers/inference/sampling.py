"""Choosing the next token of every row of a batch at once, with per-row parameters.

Greedy rows take the argmax. Sampled rows (temperature > 0) are drawn by inverse
CDF over their own temperature- and top-p-adjusted distribution, with a uniform
number from the row's own `torch.Generator`: a seeded request gets the same
tokens whatever else shares its batch.
"""

from __future__ import annotations

import os
import random
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

#: Uniform numbers drawn from a row's generator at a time (one per token).
_DRAWS = 64
#: Below this temperature a row is greedy.
GREEDY_BELOW = 1e-5


#: Seeds of unseeded rows (seeded once from the OS: os.urandom per row is slow on some VMs).
_seeds = random.Random(os.urandom(16))  # noqa: S311 - sampling, not secrets
_seeds_lock = threading.Lock()


class Random:
    """A row's own stream of uniform numbers in [0, 1), from its own torch.Generator
    (created on the first draw: greedy rows never need one)."""

    __slots__ = ("_buffer", "_generator", "_next", "seed")

    def __init__(self, seed: int | None) -> None:
        self.seed = seed
        self._generator: torch.Generator | None = None
        self._buffer: list[float] = []
        self._next = 0

    def uniform(self) -> float:
        if self._next >= len(self._buffer):
            if self._generator is None:
                seed = self.seed
                if seed is None:
                    with _seeds_lock:
                        seed = _seeds.getrandbits(63)
                self._generator = torch.Generator().manual_seed(seed)
            self._buffer = torch.rand(
                _DRAWS, generator=self._generator, dtype=torch.float64
            ).tolist()
            self._next = 0
        value = self._buffer[self._next]
        self._next += 1
        return value


def row_seed(seed: int | None, index: int) -> int | None:
    """The seed of choice `index` of a request seeded with `seed` (None: unseeded)."""
    if seed is None:
        return None
    return (seed * 0x9E3779B97F4A7C15 + index * 0xBF58476D1CE4E5B9 + 1) % 2**63


class SamplingRow(Protocol):
    temperature: float
    top_p: float
    top_logprobs: int
    want_logprobs: bool
    random: Random


@dataclass
class Plan:
    """What a set of rows needs, built when the rows change (not on every step)."""

    sampled: torch.Tensor | None  # row indices that sample
    temperatures: torch.Tensor | None  # (S, 1)
    top_p: torch.Tensor | None  # (S, 1), None when every sampled row uses 1.0
    logprob_rows: torch.Tensor | None
    top_k: int
    randoms: list[Random]
    any_greedy: bool


def plan(rows: Sequence[SamplingRow], device: torch.device) -> Plan:
    sampled = [i for i, r in enumerate(rows) if r.temperature >= GREEDY_BELOW]
    logprob_rows = [i for i, r in enumerate(rows) if r.want_logprobs]
    top_p = [min(1.0, max(1e-6, rows[i].top_p)) for i in sampled]
    return Plan(
        sampled=torch.tensor(sampled, device=device) if sampled else None,
        temperatures=(
            torch.tensor([rows[i].temperature for i in sampled], device=device)[:, None]
            if sampled
            else None
        ),
        top_p=torch.tensor(top_p, device=device)[:, None] if any(p < 1 for p in top_p) else None,
        logprob_rows=torch.tensor(logprob_rows, device=device) if logprob_rows else None,
        top_k=max((r.top_logprobs for r in rows if r.want_logprobs), default=0),
        randoms=[rows[i].random for i in sampled],
        any_greedy=len(sampled) < len(rows),
    )


@dataclass
class Logprobs:
    rows: list[int]  # batch row of each entry below
    chosen: list[float]
    top_ids: list[list[int]]
    top_values: list[list[float]]


def choose(logits: torch.Tensor, p: Plan) -> tuple[torch.Tensor, Logprobs | None]:
    """The next token of each row (B,), and log-probabilities where rows asked for them."""
    logits = logits.float()
    if p.any_greedy or p.sampled is None:
        tokens = logits.argmax(-1)
    else:
        tokens = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
    if p.sampled is not None:
        assert p.temperatures is not None
        probs = torch.softmax(logits.index_select(0, p.sampled) / p.temperatures, dim=-1)
        u = torch.tensor([r.uniform() for r in p.randoms], device=logits.device, dtype=probs.dtype)
        if p.top_p is not None:
            ordered, order = probs.sort(dim=-1, descending=True)
            # Keep the smallest prefix whose mass reaches top_p (always the first token).
            keep = (ordered.cumsum(-1) - ordered) < p.top_p
            cdf = (ordered * keep).cumsum(-1)
            pick = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)
            # u rounds to 1.0 in float32 once in ~10^7 draws: stay within the kept tokens.
            pick = torch.minimum(pick, keep.sum(-1, keepdim=True) - 1)
            chosen = order.gather(1, pick)[:, 0]
        else:
            cdf = probs.cumsum(-1)
            pick = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)
            chosen = pick.clamp_(max=probs.shape[-1] - 1)[:, 0]
        tokens.index_copy_(0, p.sampled, chosen)
    if p.logprob_rows is None:
        return tokens, None
    log_probs = torch.log_softmax(logits.index_select(0, p.logprob_rows), dim=-1)
    chosen_lp = log_probs.gather(1, tokens.index_select(0, p.logprob_rows)[:, None])[:, 0]
    rows = p.logprob_rows.tolist()
    if p.top_k > 0:
        values, ids = log_probs.topk(p.top_k, dim=-1)
        top_ids, top_values = ids.tolist(), values.tolist()
    else:
        top_ids, top_values = [[] for _ in rows], [[] for _ in rows]
    return tokens, Logprobs(rows, chosen_lp.tolist(), top_ids, top_values)
