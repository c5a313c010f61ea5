"""Training files → token sequences with a mask of the tokens the loss is computed on.

The file is read line by line from a local copy (never whole in memory) and each
row becomes one sequence (two for preference rows: chosen, then rejected). Token
ids are kept in flat `array`s, four bytes a token, not in per-row Python lists.

`formats` turns each row into a text plus the character spans that are learned;
the text is tokenized whole (as it will be at inference) and a token is learned
when it overlaps a span.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gpuworkers.training import formats
from gpuworkers.training.errors import TrainingError
from gpuworkers.training.formats import Sample

ENCODE_BATCH = 256
IGNORE = -100


@dataclass
class TokenizedSet:
    """Rows of token ids; `per_row` sequences a row (2 for preference: chosen, rejected)."""

    kind: str  # "lm" | "classification" | "preference"
    per_row: int = 1
    ids: array[int] = field(default_factory=lambda: array("i"))
    learn: array[int] = field(default_factory=lambda: array("B"))
    starts: array[int] = field(default_factory=lambda: array("q", [0]))
    labels: array[int] = field(default_factory=lambda: array("i"))

    def __len__(self) -> int:
        return (len(self.starts) - 1) // self.per_row

    def add(self, ids: Sequence[int], learn: Sequence[int], label: int = -1) -> None:
        self.ids.extend(ids)
        self.learn.extend(learn)
        self.starts.append(len(self.ids))
        self.labels.append(label)

    def select(self, rows: Sequence[int]) -> TokenizedSet:
        """A new set of these rows (indices into this one), in the order given."""
        out = TokenizedSet(kind=self.kind, per_row=self.per_row)
        for row in rows:
            for s in range(row * self.per_row, (row + 1) * self.per_row):
                a, b = self.starts[s], self.starts[s + 1]
                out.ids.extend(self.ids[a:b])
                out.learn.extend(self.learn[a:b])
                out.starts.append(len(out.ids))
                out.labels.append(self.labels[s])
        return out

    def learned_tokens(self) -> int:
        return sum(self.learn)

    def collate(self, rows: Sequence[int], pad_id: int) -> dict[str, torch.Tensor]:
        """Right-padded tensors for `rows`; preference: all chosen first, then all rejected."""
        seqs = [row * self.per_row + k for k in range(self.per_row) for row in rows]
        length = max(self.starts[s + 1] - self.starts[s] for s in seqs)
        input_ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)
        attention = torch.zeros((len(seqs), length), dtype=torch.long)
        labels = torch.full((len(seqs), length), IGNORE, dtype=torch.long)
        for i, s in enumerate(seqs):
            a, b = self.starts[s], self.starts[s + 1]
            ids = torch.tensor(self.ids[a:b], dtype=torch.long)
            input_ids[i, : b - a] = ids
            attention[i, : b - a] = 1
            learn = torch.tensor(self.learn[a:b], dtype=torch.bool)
            labels[i, : b - a] = torch.where(learn, ids, IGNORE)
        batch = {"input_ids": input_ids, "attention_mask": attention}
        if self.kind == "classification":
            batch["labels"] = torch.tensor([self.labels[s] for s in seqs], dtype=torch.long)
        else:
            batch["labels"] = labels
        return batch


def load(
    path: Path,
    *,
    fmt: str,
    tokenizer: Any,
    labels: Sequence[str],
    max_len: int,
    what: str = "training",
) -> TokenizedSet:
    """Tokenize a local JSONL (or text) file; TrainingError names the bad line."""
    code = f"invalid_{what}_file"
    kind = {"classification": "classification", "preference": "preference"}.get(fmt, "lm")
    out = TokenizedSet(kind=kind, per_row=2 if kind == "preference" else 1)
    maker = formats.SampleMaker(fmt, tokenizer, labels)
    pending: list[tuple[int, Sample]] = []
    for line_no, row in formats.rows(path, fmt, code):
        try:
            samples = maker.make(row)
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise TrainingError(
                code, f"{what} file line {line_no}: {formats.reason(error, fmt)}"
            ) from None
        pending.extend((line_no, sample) for sample in samples)
        if len(pending) >= ENCODE_BATCH:
            _encode(pending, out, tokenizer, max_len=max_len, chat=fmt == "chat", code=code)
            pending = []
    if pending:
        _encode(pending, out, tokenizer, max_len=max_len, chat=fmt == "chat", code=code)
    if len(out) == 0:
        raise TrainingError(code, f"the {what} file has no rows")
    if kind != "classification" and out.learned_tokens() == 0:
        raise TrainingError(code, f"no row of the {what} file has tokens to learn from")
    return out


def _encode(
    pending: list[tuple[int, Sample]],
    out: TokenizedSet,
    tokenizer: Any,
    *,
    max_len: int,
    chat: bool,
    code: str,
) -> None:
    texts = [sample.text for _, sample in pending]
    if out.kind == "classification":
        encoded = tokenizer(texts, truncation=True, max_length=max_len)
        for (_, sample), ids in zip(pending, encoded["input_ids"], strict=True):
            out.add(ids, [0] * len(ids), sample.label)
        return
    # Chat templates carry their own special tokens; other text gets the tokenizer's (BOS).
    encoded = tokenizer(texts, add_special_tokens=not chat, return_offsets_mapping=True)
    eos = tokenizer.eos_token_id
    for (line_no, sample), ids, offsets in zip(
        pending, encoded["input_ids"], encoded["offset_mapping"], strict=True
    ):
        ids = list(ids)
        learn = [
            int(end > start and any(start < b and end > a for a, b in sample.spans))
            for start, end in offsets
        ]
        if sample.append_eos and eos is not None and (not ids or ids[-1] != eos):
            ids.append(eos)
            learn.append(1)
        if not ids:
            raise TrainingError(code, f"line {line_no}: no tokens")
        ids, learn = _fit(ids, learn, max_len)
        out.add(ids, learn)


def _fit(ids: list[int], learn: list[int], max_len: int) -> tuple[list[int], list[int]]:
    """Truncate to `max_len` (never fail): keep the start, unless that loses every
    learned token — then keep some context before the first one and what follows."""
    if len(ids) <= max_len:
        return ids, learn
    try:
        first = learn.index(1)
    except ValueError:
        first = 0
    start = max(0, min(first - max_len // 2, len(ids) - max_len))
    return ids[start : start + max_len], learn[start : start + max_len]


class BatchOrder:
    """Rows of each global step: a seeded permutation per epoch, so a resumed
    attempt sees exactly the batches an uninterrupted one would."""

    def __init__(self, n_rows: int, batch_size: int, seed: int) -> None:
        self.n_rows = n_rows
        self.batch_size = batch_size
        self.seed = seed
        self.per_epoch = steps_per_epoch(n_rows, batch_size)
        self._epoch = -1
        self._order: list[int] = []

    def epoch(self, step: int) -> int:
        """0-based epoch of a 1-based step."""
        return (step - 1) // self.per_epoch

    def rows(self, step: int) -> list[int]:
        epoch, index = divmod(step - 1, self.per_epoch)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._order = torch.randperm(self.n_rows, generator=generator).tolist()
            self._epoch = epoch
        return self._order[index * self.batch_size : (index + 1) * self.batch_size]


def steps_per_epoch(n_rows: int, batch_size: int) -> int:
    return -(-n_rows // batch_size)
