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

    def row_lengths(self) -> list[int]:
        """Tokens of each row (preference: its longer sequence, which sets the padding)."""
        starts, k = self.starts, self.per_row
        return [
            max(starts[s + 1] - starts[s] for s in range(row * k, (row + 1) * k))
            for row in range(len(self))
        ]

    def sequence_lengths(self, rows: Sequence[int]) -> list[int]:
        starts, k = self.starts, self.per_row
        return [starts[s + 1] - starts[s] for row in rows for s in range(row * k, (row + 1) * k)]

    def collate_packed(
        self, rows: Sequence[int], pad_id: int, capacity: int | None
    ) -> dict[str, torch.Tensor]:
        """Causal-LM rows packed into few sequences, no attention across row boundaries.

        Rows are placed first-fit, longest first, into sequences of at most `capacity`
        tokens (at least the longest row's: 0 means that); `capacity=None` puts them all
        in one sequence, for the flash-attention varlen path (transformers reads the row
        boundaries from `position_ids` there, with batch size 1 only). `position_ids`
        restart at 0 with each row, and there is no `attention_mask` for the model: from
        restarting positions transformers builds a block-diagonal causal mask (eager,
        SDPA) or cumulative sequence lengths (flash attention). The padding at the end of
        a sequence is a block of its own, learned by nothing. A row's first token is no
        target (it would be predicted from the previous row), as unpacked; so the loss
        summed over a packed batch is the loss of its rows run one by one.
        """
        if self.kind != "lm":
            raise ValueError(f"only causal-LM rows are packed, not {self.kind}")
        lengths = self.sequence_lengths(rows)
        bins: list[list[int]] = []
        if capacity is None:
            bins = [list(range(len(rows)))]
        else:
            room: list[int] = []
            limit = max(capacity, max(lengths))
            for i in sorted(range(len(rows)), key=lambda i: -lengths[i]):
                for b, free in enumerate(room):
                    if lengths[i] <= free:
                        bins[b].append(i)
                        room[b] -= lengths[i]
                        break
                else:
                    bins.append([i])
                    room.append(limit - lengths[i])
        width = max(sum(lengths[i] for i in members) for members in bins)
        shape = (len(bins), width)
        input_ids = torch.full(shape, pad_id, dtype=torch.long)
        labels = torch.full(shape, IGNORE, dtype=torch.long)
        real = torch.zeros(shape, dtype=torch.long)
        positions = torch.zeros(shape, dtype=torch.long)
        for b, members in enumerate(bins):
            at = 0
            for i in members:
                a, z = self.starts[rows[i]], self.starts[rows[i] + 1]
                n = z - a
                ids = torch.tensor(self.ids[a:z], dtype=torch.long)
                learn = torch.tensor(self.learn[a:z], dtype=torch.bool)
                input_ids[b, at : at + n] = ids
                labels[b, at : at + n] = torch.where(learn, ids, IGNORE)
                labels[b, at] = IGNORE
                real[b, at : at + n] = 1
                positions[b, at : at + n] = torch.arange(n)
                at += n
            positions[b, at:] = torch.arange(width - at)
        return {
            "input_ids": input_ids,
            # Counts the real tokens; never given to the model with `position_ids`.
            "attention_mask": real,
            "position_ids": positions,
            "labels": labels,
        }


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


#: Batches in a mega-batch, at most: as Hugging Face's `LengthGroupedSampler`, 50 or
#: what makes 4 mega-batches an epoch, whichever is smaller (at least 1).
MEGA_BATCH_FACTOR = 50


def default_mega_batch_factor(n_rows: int, batch_size: int) -> int:
    return max(1, min(n_rows // (4 * batch_size), MEGA_BATCH_FACTOR))


class BatchOrder:
    """Rows of each global step, a pure function of (seed, epoch, row lengths), so a
    resumed attempt sees exactly the batches an uninterrupted one would.

    Without `lengths`: a seeded permutation per epoch, cut into batches. With them
    (length grouping, the default): the same permutation cut into mega-batches of
    `mega_batch_factor` batches (by default `default_mega_batch_factor(n_rows, batch_size)`, as
    Hugging Face's sampler), each sorted by length (longest first) and cut into batches
    of similar length, then the batches shuffled with the same seeded generator, so a
    batch carries little padding and which rows share a batch, and when, stays random.
    """

    def __init__(
        self,
        n_rows: int,
        batch_size: int,
        seed: int,
        lengths: Sequence[int] | None = None,
        mega_batch_factor: int | None = None,
    ) -> None:
        if lengths is not None and len(lengths) != n_rows:
            raise ValueError(f"{len(lengths)} lengths for {n_rows} rows")
        self.n_rows = n_rows
        self.batch_size = batch_size
        self.seed = seed
        self.lengths = list(lengths) if lengths is not None else None
        factor = mega_batch_factor or default_mega_batch_factor(n_rows, batch_size)
        self.mega = max(1, factor) * batch_size
        self.per_epoch = steps_per_epoch(n_rows, batch_size)
        self._epoch = -1
        self._batches: list[list[int]] = []

    @property
    def grouped(self) -> bool:
        return self.lengths is not None

    def epoch(self, step: int) -> int:
        """0-based epoch of a 1-based step."""
        return (step - 1) // self.per_epoch

    def rows(self, step: int) -> list[int]:
        epoch, index = divmod(step - 1, self.per_epoch)
        if epoch != self._epoch:
            self._batches = self.batches(epoch)
            self._epoch = epoch
        return list(self._batches[index])

    def batches(self, epoch: int) -> list[list[int]]:
        """Every batch of a 0-based epoch, in the order they are trained."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(self.n_rows, generator=generator).tolist()
        size = self.batch_size
        if self.lengths is None:
            return [order[i : i + size] for i in range(0, self.n_rows, size)]
        lengths = self.lengths
        batches: list[list[int]] = []
        for first in range(0, self.n_rows, self.mega):
            # Stable sort: rows of equal length keep their shuffled order.
            mega = sorted(order[first : first + self.mega], key=lambda row: -lengths[row])
            batches += [mega[i : i + size] for i in range(0, len(mega), size)]
        shuffled = torch.randperm(len(batches), generator=generator).tolist()
        return [batches[i] for i in shuffled]


def padding_share(dataset: TokenizedSet, batches: Sequence[Sequence[int]]) -> float:
    """The share of padding in right-padded batches of `dataset` (what `collate` builds)."""
    real = padded = 0
    lengths = dataset.row_lengths()
    for rows in batches:
        if rows:
            real += sum(dataset.sequence_lengths(rows))
            padded += max(lengths[row] for row in rows) * len(rows) * dataset.per_row
    return 1 - real / padded if padded else 0.0


def steps_per_epoch(n_rows: int, batch_size: int) -> int:
    return -(-n_rows // batch_size)
