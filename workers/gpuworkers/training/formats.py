"""Rows of each training-data format → a text and the character spans the model learns.

chat → the rendered chat template, spans = the assistant turns (with their
end-of-turn marker); prompt_completion → prompt + completion, span = the
completion; text → all of it; preference → prompt + chosen and prompt + rejected,
span = the response; classification → the text and a label id.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpuworkers.training.errors import TrainingError

#: ChatML, for base models whose tokenizer has no chat template of its own.
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass
class Sample:
    text: str
    #: Character spans whose tokens are learned (causal LM); empty for classification.
    spans: list[tuple[int, int]] = field(default_factory=list)
    label: int = -1
    append_eos: bool = False


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


def reason(error: Exception, fmt: str) -> str:
    if isinstance(error, KeyError):
        return f"missing field {error.args[0]!r} for format {fmt}"
    return str(error) or type(error).__name__


def rows(path: Path, fmt: str, code: str) -> Iterator[tuple[int, Any]]:
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


class SampleMaker:
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
