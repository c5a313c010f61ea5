"""Training files → token sequences with a mask of the tokens the loss is computed on.

The file is read line by line from a local copy (never whole in memory) and each
row becomes one sequence (two for preference rows: chosen, then rejected). Token
ids are kept in flat `array`s, four bytes a token, not in per-row Python lists.

Every format is reduced to a text plus the character spans that are learned:
chat → the rendered chat template, spans = the assistant turns; prompt_completion
→ prompt + completion, span = the completion; text → all of it; preference →
prompt + chosen / prompt + rejected, span = the response. The text is tokenized
whole (as it will be at inference) and a token is learned when it overlaps a span.
"""

from __future__ import annotations

import json
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gpuworkers.training.errors import TrainingError

#: ChatML, for base models whose tokenizer has no chat template of its own.
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
ENCODE_BATCH = 256
IGNORE = -100


@dataclass
class Sample:
    text: str
    #: Character spans whose tokens are learned (causal LM); empty for classification.
    spans: list[tuple[int, int]] = field(default_factory=list)
    label: int = -1
    append_eos: bool = False


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


def check_format(fmt: str, *, task: str, method: str) -> None:
    if task == "classification" and fmt != "classification":
        raise TrainingError(
            "invalid_spec", f"a classification job needs classification data, got {fmt}"
        )
    if task == "causal_lm" and fmt == "classification":
        raise TrainingError("invalid_spec", "classification data needs task classification")
    if (method == "dpo") != (fmt == "preference"):
        raise TrainingError(
            "invalid_spec", "DPO trains on preference data, and preference data needs method dpo"
        )


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
    maker = _SampleMaker(fmt, tokenizer, labels)
    pending: list[tuple[int, Sample]] = []
    for line_no, row in _rows(path, fmt, code):
        try:
            samples = maker.make(row)
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise TrainingError(
                code, f"{what} file line {line_no}: {_reason(error, fmt)}"
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


def _reason(error: Exception, fmt: str) -> str:
    if isinstance(error, KeyError):
        return f"missing field {error.args[0]!r} for format {fmt}"
    return str(error) or type(error).__name__


def _rows(path: Path, fmt: str, code: str) -> Iterator[tuple[int, Any]]:
    with path.open("rb") as stream:
        for line_no, raw in enumerate(stream, start=1):
            try:
                line = raw.decode("utf-8").removeprefix("\ufeff").rstrip("\r\n")
            except UnicodeDecodeError:
                raise TrainingError(code, f"line {line_no}: not valid UTF-8") from None
            if not line.strip():
                continue
            if fmt == "text":
                yield line_no, _text_line(line)
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as error:
                raise TrainingError(code, f"line {line_no}: not JSON ({error.msg})") from None
            if not isinstance(obj, dict):
                raise TrainingError(code, f"line {line_no}: expected a JSON object")
            yield line_no, obj


def _text_line(line: str) -> str:
    # Plain text, one document a line; a JSON Lines file of {"text": …} works too.
    if line.lstrip().startswith("{"):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            return line
        if isinstance(obj, dict) and isinstance(obj.get("text"), str):
            return str(obj["text"])
    return line


def _string(value: Any, name: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{name} must be a non-empty string")
    return value


class _SampleMaker:
    def __init__(self, fmt: str, tokenizer: Any, labels: Sequence[str]) -> None:
        self.fmt = fmt
        self.tokenizer = tokenizer
        self.labels = {name: i for i, name in enumerate(labels)}
        self.template = getattr(tokenizer, "chat_template", None) or FALLBACK_CHAT_TEMPLATE

    def make(self, row: Any) -> list[Sample]:
        if self.fmt == "text":
            return [Sample(row, [(0, len(row))], append_eos=True)]
        if self.fmt == "prompt_completion":
            prompt = _string(row["prompt"], "prompt")
            completion = _string(row["completion"], "completion")
            text = prompt + completion
            return [Sample(text, [(len(prompt), len(text))], append_eos=True)]
        if self.fmt == "classification":
            label = row["label"]
            key = str(label) if isinstance(label, int) and not isinstance(label, bool) else label
            if not isinstance(key, str) or key not in self.labels:
                known = ", ".join(self.labels)
                raise ValueError(f"label {label!r} is not one of the job's labels ({known})")
            return [Sample(_string(row["text"], "text"), label=self.labels[key])]
        if self.fmt == "chat":
            return [self._chat(_messages(row["messages"], "messages"))]
        return self._preference(row)

    def _render(self, messages: list[dict[str, str]], *, generation_prompt: bool = False) -> str:
        return str(
            self.tokenizer.apply_chat_template(
                messages,
                chat_template=self.template,
                tokenize=False,
                add_generation_prompt=generation_prompt,
            )
        )

    def _chat(self, messages: list[dict[str, Any]]) -> Sample:
        clean = [{"role": m["role"], "content": m["content"]} for m in messages]
        full = self._render(clean)
        spans: list[tuple[int, int]] = []
        cursor = 0
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = self._render(clean[:i], generation_prompt=True) if i else ""
            through = self._render(clean[: i + 1])
            if i and full.startswith(through) and through.startswith(before):
                span = (len(before), len(through))  # the turn, with its end-of-turn marker
            else:  # a template that is not prefix-stable: learn the content itself
                start = full.find(message["content"], cursor)
                if start < 0:
                    raise ValueError("the chat template drops an assistant message")
                span = (start, start + len(message["content"]))
            cursor = span[1]
            if message.get("weight", 1) != 0:
                spans.append(span)
        if not any(m["role"] == "assistant" for m in messages):
            raise ValueError("needs at least one assistant message to learn from")
        return Sample(full, spans)

    def _preference(self, row: dict[str, Any]) -> list[Sample]:
        chosen = _string(row["chosen"], "chosen")
        rejected = _string(row["rejected"], "rejected")
        prompt = row["prompt"] if "prompt" in row else row["messages"]
        if isinstance(prompt, list):
            clean = [
                {"role": m["role"], "content": m["content"]} for m in _messages(prompt, "prompt")
            ]
            before = self._render(clean, generation_prompt=True)
            out = []
            for response in (chosen, rejected):
                text = self._render([*clean, {"role": "assistant", "content": response}])
                if not text.startswith(before):
                    start = text.rfind(response)
                    out.append(Sample(text, [(start, start + len(response))]))
                else:
                    out.append(Sample(text, [(len(before), len(text))]))
            return out
        prompt = _string(prompt, "prompt")
        return [
            Sample(prompt + response, [(len(prompt), len(prompt) + len(response))], append_eos=True)
            for response in (chosen, rejected)
        ]


def _messages(value: Any, name: str) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not value:
        raise ValueError(f"{name} must be a non-empty list of messages")
    for message in value:
        if not isinstance(message, dict):
            raise ValueError(f"{name} must hold objects with role and content")
        _string(message["role"], "role")
        if not isinstance(message["content"], str):
            raise ValueError("message content must be a string")
    return value


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
