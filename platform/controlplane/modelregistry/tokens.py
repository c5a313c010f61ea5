"""Token counts of a stored dataset for a base model's tokenizer, and what training would cost.

Only the `tokenizers` library (Rust, no torch): the web process and the
`control` worker stay light. A dataset is streamed line by line and encoded in
batches, so memory does not grow with the file; token lengths go into the same
reservoir-sampled `LengthStats` the validation report uses.

How rows become text — an approximation of what the training engine feeds the
model, close enough to price a job:

- chat: each message as ChatML, `<|im_start|>{role}\\n{content}<|im_end|>\\n`,
  when the tokenizer has those special tokens; otherwise `{role}\\n{content}\\n`.
  An assistant turn's `tool_calls` count as their JSON;
- prompt_completion: prompt + completion;
- preference: prompt + chosen and prompt + rejected, two sequences (a prompt
  given as messages is rendered as chat). The row's length is the longer one;
- pairs: the query and the positive, two sequences (an embedding model encodes each
  on its own). The row's length is the longer one;
- classification, text: the text;
- csv: the `text` column, or else the columns named like text
  (prompt, completion, input, output, content), or else every column, joined
  by newlines.

Counts include the tokenizer's own special tokens (`[CLS]`/`[SEP]` for BERT),
never its truncation or padding. `trained_tokens` caps each sequence at the
sequence limit (`max_seq_len`, else the model's context length), as training
truncates: that is what a job is priced on.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Final

import orjson

from controlplane.datasets import storage
from controlplane.datasets.validation import (
    DEFAULT_MAX_LINE_BYTES,
    FORMATS,
    LengthStats,
    iter_lines,
)

from . import artifacts
from .models import BaseModel

if TYPE_CHECKING:
    from tokenizers import Tokenizer

#: Sequences encoded per `encode_batch` call, and the characters that flush a batch early.
BATCH_SEQUENCES: Final = 512
BATCH_CHARS: Final = 4 * 1024 * 1024

#: CSV columns that hold text to train on, in the order they are joined.
CSV_TEXT_COLUMNS: Final = ("text", "prompt", "completion", "input", "output", "content")

#: OpenAI's heuristic for `n_epochs: "auto"`: 3 epochs, but at least 100 and at
#: most 25,000 examples seen in total, and between 1 and 25 epochs.
DEFAULT_EPOCHS: Final = 3
MIN_TARGET_EXAMPLES: Final = 100
MAX_TARGET_EXAMPLES: Final = 25_000
MAX_AUTO_EPOCHS: Final = 25

_IM_START: Final = "<|im_start|>"
_IM_END: Final = "<|im_end|>"


@dataclass
class TokenStats:
    format: str
    context_length: int
    max_seq_len: int | None
    rows: int = 0
    sequences: int = 0
    #: Every token of every sequence, nothing truncated.
    total_tokens: int = 0
    #: Tokens training sees: each sequence capped at the sequence limit.
    trained_tokens: int = 0
    #: Per row: its token length (the longer sequence of a preference pair).
    lengths: LengthStats = field(default_factory=LengthStats)
    rows_over_context: int = 0
    rows_over_max_seq_len: int = 0
    #: Lines that did not parse (a processed file has none).
    skipped_rows: int = 0

    @property
    def sequence_limit(self) -> int:
        if self.max_seq_len is None:
            return self.context_length
        return min(self.max_seq_len, self.context_length)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "rows": self.rows,
            "sequences": self.sequences,
            "total_tokens": self.total_tokens,
            "trained_tokens": self.trained_tokens,
            "per_row": {**self.lengths.to_dict(), "p95": self.lengths.percentile(95)},
            "context_length": self.context_length,
            "max_seq_len": self.max_seq_len,
            "rows_over_context": self.rows_over_context,
            "rows_over_max_seq_len": (
                self.rows_over_max_seq_len if self.max_seq_len is not None else None
            ),
            "skipped_rows": self.skipped_rows,
        }


# --- tokenizers ---------------------------------------------------------------------------


def tokenizer_for(base: BaseModel) -> Tokenizer:
    """The base model's tokenizer (its tokenizer.json), loaded once per process."""
    return _tokenizer_at(base.uri)


@lru_cache(maxsize=16)
def _tokenizer_at(uri: str) -> Tokenizer:
    from tokenizers import Tokenizer

    with artifacts.open_uri(artifacts.join_uri(uri, "tokenizer.json")) as stream:
        tokenizer = Tokenizer.from_str(stream.read().decode("utf-8"))
    # Counting, not batching for a model: a saved truncation (MiniLM ships 128) or
    # padding would make every count wrong.
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return tokenizer


# --- rendering rows -----------------------------------------------------------------------


def _message_text(message: Any) -> tuple[str, str]:
    if not isinstance(message, dict):
        return "", ""
    role = message.get("role")
    content = message.get("content")
    text = content if isinstance(content, str) else ""
    if isinstance(content, list):  # content parts: the text ones
        text = "".join(
            part["text"]
            for part in content
            if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    tool_calls = message.get("tool_calls")
    if tool_calls:
        text += orjson.dumps(tool_calls).decode()
    return (role if isinstance(role, str) else ""), text


def _chat_renderer(tokenizer: Tokenizer) -> Callable[[Any], str]:
    chatml = tokenizer.token_to_id(_IM_START) is not None and (
        tokenizer.token_to_id(_IM_END) is not None
    )

    def render(messages: Any) -> str:
        parts = []
        for message in messages if isinstance(messages, list) else ():
            role, text = _message_text(message)
            if chatml:
                parts.append(f"{_IM_START}{role}\n{text}{_IM_END}\n")
            else:
                parts.append(f"{role}\n{text}\n")
        return "".join(parts)

    return render


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _row_renderer(format: str, tokenizer: Tokenizer) -> Callable[[bytes], list[str] | None]:
    """A function from one JSON Lines row to its sequences (None if it does not parse)."""
    chat = _chat_renderer(tokenizer)

    def parse(line: bytes) -> dict[str, Any] | None:
        try:
            row = orjson.loads(line)
        except orjson.JSONDecodeError:
            return None
        return row if isinstance(row, dict) else None

    def render(line: bytes) -> list[str] | None:
        row = parse(line)
        if row is None:
            return None
        if format == "chat":
            return [chat(row.get("messages"))]
        if format == "prompt_completion":
            return [_text(row.get("prompt")) + _text(row.get("completion"))]
        if format == "preference":
            prompt = row.get("prompt", row.get("messages"))
            shown = chat(prompt) if isinstance(prompt, list) else _text(prompt)
            return [shown + _text(row.get("chosen")), shown + _text(row.get("rejected"))]
        if format == "pairs":
            return [_text(row.get("query")), _text(row.get("positive"))]
        return [_text(row.get("text"))]  # classification

    return render


def _csv_texts(lines: Iterator[tuple[int, bytes | None]], stats: TokenStats) -> Iterator[list[str]]:
    columns: list[int] | None = None
    for _, line in lines:
        if line is None:
            stats.skipped_rows += 1
            continue
        try:
            cells = next(csv.reader((line.decode("utf-8"),), strict=True))
        except (UnicodeDecodeError, csv.Error, StopIteration):
            stats.skipped_rows += 1
            continue
        if columns is None:
            columns = _text_columns(cells)
            continue
        yield ["\n".join(cells[i] for i in columns if i < len(cells))]


def _text_columns(header: list[str]) -> list[int]:
    names = [name.strip().lower() for name in header]
    if "text" in names:
        return [names.index("text")]
    chosen = [i for i, name in enumerate(names) if name in CSV_TEXT_COLUMNS]
    return chosen or list(range(len(header)))


# --- counting -----------------------------------------------------------------------------


def count_dataset_tokens(
    *,
    base: BaseModel,
    storage_name: str,
    format: str,
    max_seq_len: int | None = None,
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
) -> TokenStats:
    """Count a stored dataset's tokens for `base`'s tokenizer, streaming (see the module doc)."""
    if format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; expected one of {', '.join(FORMATS)}")
    if max_seq_len is not None and max_seq_len < 1:
        raise ValueError("max_seq_len must be at least 1")
    tokenizer = tokenizer_for(base)
    stats = TokenStats(format=format, context_length=base.context_length, max_seq_len=max_seq_len)
    with storage.open_object(storage_name) as stream:
        for batch in _batches(_rows(stream, format, tokenizer, stats, max_line_bytes)):
            _count_batch(tokenizer, batch, stats)
    return stats


def _rows(
    stream: Any, format: str, tokenizer: Tokenizer, stats: TokenStats, max_line_bytes: int
) -> Iterator[list[str]]:
    """Each row's sequences, blank lines skipped."""
    lines = iter_lines(stream, max_line_bytes=max_line_bytes)
    nonblank = ((n, line) for n, line in lines if line is None or line.strip())
    if format == "csv":
        yield from _csv_texts(nonblank, stats)
        return
    if format == "text":
        for _, line in nonblank:
            try:
                text = line.decode("utf-8") if line is not None else None
            except UnicodeDecodeError:
                text = None
            if text is None:
                stats.skipped_rows += 1
            else:
                yield [text]
        return
    render = _row_renderer(format, tokenizer)
    for _, line in nonblank:
        sequences = render(line) if line is not None else None
        if sequences is None:
            stats.skipped_rows += 1
        else:
            yield sequences


def _batches(rows: Iterator[list[str]]) -> Iterator[list[list[str]]]:
    batch: list[list[str]] = []
    count = chars = 0
    for sequences in rows:
        batch.append(sequences)
        count += len(sequences)
        chars += sum(map(len, sequences))
        if count >= BATCH_SEQUENCES or chars >= BATCH_CHARS:
            yield batch
            batch, count, chars = [], 0, 0
    if batch:
        yield batch


def _count_batch(tokenizer: Tokenizer, batch: list[list[str]], stats: TokenStats) -> None:
    flat = [text for sequences in batch for text in sequences]
    encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)  # no offsets
    counts = [len(encoding.ids) for encoding in encode(flat, add_special_tokens=True)]
    limit = stats.sequence_limit
    row_lengths: list[int] = []
    position = 0
    for sequences in batch:
        lengths = counts[position : position + len(sequences)]
        position += len(sequences)
        longest = max(lengths)
        row_lengths.append(longest)
        stats.total_tokens += sum(lengths)
        stats.trained_tokens += sum(min(n, limit) for n in lengths)
        if longest > stats.context_length:
            stats.rows_over_context += 1
        if stats.max_seq_len is not None and longest > stats.max_seq_len:
            stats.rows_over_max_seq_len += 1
    stats.rows += len(batch)
    stats.sequences += len(flat)
    stats.lengths.add_many(row_lengths)


# --- price --------------------------------------------------------------------------------


def auto_epochs(rows: int) -> int:
    """What `n_epochs: "auto"` means for a dataset of `rows` examples (OpenAI's heuristic)."""
    rows = max(rows, 1)
    if rows * DEFAULT_EPOCHS < MIN_TARGET_EXAMPLES:
        return min(MAX_AUTO_EPOCHS, math.ceil(MIN_TARGET_EXAMPLES / rows))
    if rows * DEFAULT_EPOCHS > MAX_TARGET_EXAMPLES:
        return max(1, MAX_TARGET_EXAMPLES // rows)
    return DEFAULT_EPOCHS


def training_price(*, base: BaseModel, tokens: int, n_epochs: int) -> Decimal:
    """tokens * epochs / 1000 * the base model's price per 1k training tokens (exact)."""
    if tokens < 0 or n_epochs < 0:
        raise ValueError("tokens and n_epochs must not be negative")
    return Decimal(tokens * n_epochs) * base.price_per_1k_training_tokens / 1000
