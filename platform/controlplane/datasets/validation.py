"""Streaming validation of uploaded training files, with line-level errors.

A pure library over binary streams: no Django, nothing from the control plane,
so the dataset-processing Celery task can call it on a storage object and the
tests can call it on a `BytesIO`.

Memory stays constant whatever the upload: the stream is read in fixed-size
chunks (`iter_lines`), a line longer than `max_line_bytes` is dropped while it is
still being read, only the first `max_errors` errors are kept (all are counted),
length percentiles come from a fixed-size reservoir sample and at most
`MAX_LABELS` distinct classification labels are tracked.

Decisions worth knowing when reading a report:

- Line numbers are 1-based; field paths are dotted with 0-based indexes, as in
  JSON (`messages[2].role`). Line 0 means "the file as a whole".
- One error per line: the first problem found. `error_count` is therefore the
  number of bad lines (plus any file-level error), which is what a user fixing
  the file wants to know.
- Blank (whitespace-only) lines are skipped in every format and counted in
  `blank_lines`. Editors and exporters add trailing blank lines; refusing a file
  for them would be pedantic, and they carry nothing to train on.
- Lines end in `\\n`; a `\\r` before it is dropped (CRLF files are fine). A UTF-8
  byte-order mark at the start of the file is dropped (Excel writes one).
- CSV rows must fit on one line: a quoted field holding a newline is reported as
  an unterminated quoted field. Supporting it would make one stray quote swallow
  the rest of the file into a single "row" and make line numbers meaningless.
"""

from __future__ import annotations

import csv
import math
import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Final, cast

import orjson

FORMATS: Final = (
    "chat",
    "prompt_completion",
    "preference",
    "classification",
    "pairs",
    "csv",
    "text",
)
JSONL_FORMATS: Final = ("chat", "prompt_completion", "preference", "classification", "pairs")
CHAT_ROLES: Final = ("system", "user", "assistant", "tool")

#: Distinct classification labels tracked one by one; the rest count as OTHER_LABEL.
MAX_LABELS: Final = 1000
OTHER_LABEL: Final = "__other__"

#: The longest `query` or `positive` of a pairs row, in characters. An embedding model
#: reads at most a few hundred tokens of a text (512 for BERT-style encoders, about
#: 2,000 characters of English); a field many times that is a mistake (a whole document
#: where a passage belongs), not something to embed.
MAX_PAIR_TEXT_CHARS: Final = 8192

#: Size of the reservoir the length percentiles are estimated from (exact below it).
LENGTH_SAMPLE_SIZE: Final = 10_000

DEFAULT_MAX_LINE_BYTES: Final = 8 * 1024 * 1024
CHUNK_BYTES: Final = 1024 * 1024

_BOM: Final = b"\xef\xbb\xbf"
_LENGTH_BATCH: Final = 4096
_ROLE_SET: Final = frozenset(CHAT_ROLES)
_JSONL_EXTENSIONS: Final = frozenset({"jsonl", "json", "ndjson"})
_MISSING: Final = object()

# A check returns the row's length in characters, or (field, reason) for its first problem.
_CheckResult = int | tuple[str | None, str]


@dataclass(frozen=True)
class LineError:
    line: int
    field: str | None
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"line": self.line, "field": self.field, "reason": self.reason}


class LengthStats:
    """Count, min, max and mean exactly; percentiles from a reservoir sample.

    Lengths arrive in batches (`add_many`) so that the per-row cost in the
    validation loop is a list append; min, max and sum then run in C. The
    reservoir uses Algorithm L (Li, 1994), which draws random numbers only for
    the items it takes. Its generator is seeded: the same file gives the same
    report.
    """

    __slots__ = ("_next", "_random", "_sample", "_size", "_total", "_w", "count", "max", "min")

    def __init__(self, sample_size: int = LENGTH_SAMPLE_SIZE) -> None:
        if sample_size < 1:
            raise ValueError("sample_size must be at least 1")
        self._size = sample_size
        self._sample: list[int] = []
        self._random = random.Random(0)  # noqa: S311 - sampling, not security
        self._w = 1.0
        self._next = 0
        self._total = 0
        self.count = 0
        self.min = 0
        self.max = 0

    def add(self, length: int) -> None:
        self.add_many([length])

    def add_many(self, lengths: list[int]) -> None:
        if not lengths:
            return
        start = self.count
        self.min = min(lengths) if start == 0 else min(self.min, min(lengths))
        self.max = max(self.max, max(lengths))
        self._total += sum(lengths)
        self.count = start + len(lengths)
        room = self._size - len(self._sample)
        if room > 0:
            self._sample.extend(lengths[:room])
            if len(self._sample) < self._size:
                return
            self._w = math.exp(math.log(self._uniform()) / self._size)
            self._skip(self._size)
        # _next is the 1-based position of the next length to take.
        while self._next <= self.count:
            self._sample[self._random.randrange(self._size)] = lengths[self._next - start - 1]
            self._w *= math.exp(math.log(self._uniform()) / self._size)
            self._skip(self._next)

    def _uniform(self) -> float:
        # In (0, 1]: log() never sees zero.
        return 1.0 - self._random.random()

    def _skip(self, position: int) -> None:
        gap = math.floor(math.log(self._uniform()) / math.log1p(-self._w)) if self._w < 1 else 0
        self._next = position + gap + 1

    @property
    def sampled(self) -> int:
        """How many lengths the percentiles are computed from (at most the sample size)."""
        return len(self._sample)

    @property
    def mean(self) -> float:
        return self._total / self.count if self.count else 0.0

    def percentile(self, q: float) -> int:
        """Nearest-rank percentile (0 < q <= 100) of the sample; 0 when empty."""
        return _nearest_rank(sorted(self._sample), q)

    def to_dict(self) -> dict[str, Any]:
        ordered = sorted(self._sample)
        return {
            "count": self.count,
            "min": self.min,
            "max": self.max,
            "mean": round(self.mean, 2),
            "p50": _nearest_rank(ordered, 50),
            "p90": _nearest_rank(ordered, 90),
            "p99": _nearest_rank(ordered, 99),
        }


def _nearest_rank(ordered: list[int], q: float) -> int:
    if not ordered:
        return 0
    return ordered[max(1, math.ceil(q / 100 * len(ordered))) - 1]


@dataclass
class ValidationReport:
    """What validation found. `errors` keeps the first `max_errors`; `error_count` all."""

    format: str | None
    rows: int = 0
    bytes: int = 0
    error_count: int = 0
    errors: list[LineError] = field(default_factory=list)
    lengths: LengthStats = field(default_factory=LengthStats)
    label_counts: dict[str, int] | None = None
    roles: dict[str, int] = field(default_factory=dict)
    blank_lines: int = 0
    columns: list[str] | None = None

    def ok(self) -> bool:
        return self.error_count == 0 and self.rows > 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "ok": self.ok(),
            "rows": self.rows,
            "bytes": self.bytes,
            "blank_lines": self.blank_lines,
            "error_count": self.error_count,
            "errors": [error.to_dict() for error in self.errors],
            "errors_truncated": self.error_count > len(self.errors),
            "lengths": self.lengths.to_dict(),
            "label_counts": dict(self.label_counts) if self.label_counts is not None else None,
            "roles": dict(self.roles),
            "columns": list(self.columns) if self.columns is not None else None,
        }


# --- reading lines --------------------------------------------------------------------


class _LineReader:
    """Splits a binary stream into lines, reading fixed-size chunks.

    Besides the lines it records how many bytes were read and whether the line
    just yielded is a final line without a newline (a truncated upload looks
    like that), which `iter_lines`'s plain tuples cannot say.
    """

    def __init__(self, stream: BinaryIO, *, max_line_bytes: int, chunk_size: int) -> None:
        if max_line_bytes < 1:
            raise ValueError("max_line_bytes must be at least 1")
        if chunk_size < 1:
            raise ValueError("chunk_size must be at least 1")
        self._stream = stream
        self._limit = max_line_bytes
        self._chunk_size = chunk_size
        self.bytes_read = 0
        self.unterminated = False

    def batches(self) -> Iterator[tuple[int, list[bytes | None]]]:
        """Yield `(number of the first line, lines)`, one batch per chunk read.

        Batches rather than single lines: the length limit and CRLF are handled
        a chunk at a time in C (`max(map(len, ...))`, `in`), and the caller's
        loop needs no generator round trip per line. That is most of what keeps
        validation near bare parsing speed on files of short rows.
        """
        read = self._stream.read
        limit = self._limit
        pending: list[bytes] = []
        pending_len = 0
        # True while discarding the rest of an over-long line up to its newline.
        skipping = False
        line_no = 0
        while True:
            chunk = read(self._chunk_size)
            if not chunk:
                break
            self.bytes_read += len(chunk)
            parts = chunk.split(b"\n")
            tail = parts.pop()
            if parts:
                # The first part completes whatever the previous chunks started.
                head: bytes | None = parts[0]
                if skipping:
                    head = None
                    skipping = False
                elif pending:
                    pending.append(parts[0])
                    head = b"".join(pending) if pending_len + len(parts[0]) <= limit else None
                elif len(parts[0]) > limit:
                    head = None
                pending = []
                pending_len = 0
                lines = cast("list[bytes | None]", parts)
                if len(parts) > 1:
                    if max(map(len, parts)) > limit:
                        lines = [part if len(part) <= limit else None for part in parts]
                    if b"\r" in chunk:
                        lines = [_strip_cr(line) for line in lines]
                lines[0] = self._finish(head, line_no + 1)
                yield line_no + 1, lines
                line_no += len(lines)
            if skipping or not tail:
                continue
            pending_len += len(tail)
            if pending_len > limit:
                # Stop accumulating now: the line is refused whatever follows.
                pending = []
                pending_len = 0
                skipping = True
            else:
                pending.append(tail)
        if skipping or pending:
            self.unterminated = True
            last = None if skipping else b"".join(pending)
            yield line_no + 1, [self._finish(last, line_no + 1)]

    def __iter__(self) -> Iterator[tuple[int, bytes | None]]:
        return _each_line(self.batches())

    @staticmethod
    def _finish(line: bytes | None, line_no: int) -> bytes | None:
        if line is None:
            return None
        if line_no == 1 and line.startswith(_BOM):
            line = line[len(_BOM) :]
        if line.endswith(b"\r"):
            line = line[:-1]
        return line


def _strip_cr(line: bytes | None) -> bytes | None:
    return line[:-1] if line is not None and line.endswith(b"\r") else line


def iter_lines(
    stream: BinaryIO, *, max_line_bytes: int, chunk_size: int = CHUNK_BYTES
) -> Iterator[tuple[int, bytes | None]]:
    """Yield `(line_no, line)` from a binary stream, 1-based, without the newline.

    `line` is None when the line is longer than `max_line_bytes`: it is never
    held whole, reading just skips to its newline. A trailing `\\r` and a leading
    UTF-8 byte-order mark are dropped; a last line without a newline is yielded.
    """
    return iter(_LineReader(stream, max_line_bytes=max_line_bytes, chunk_size=chunk_size))


# --- detecting the format ----------------------------------------------------------------


def _extension(filename: str) -> str:
    return filename.rsplit(".", 1)[-1].lower() if "." in filename else ""


def _kind_from_keys(obj: dict[str, Any]) -> str | None:
    # Preference first: its rows often also carry `prompt` (and sometimes `messages`).
    if "chosen" in obj and "rejected" in obj:
        return "preference"
    if "messages" in obj:
        return "chat"
    if "prompt" in obj and "completion" in obj:
        return "prompt_completion"
    if "text" in obj and "label" in obj:
        return "classification"
    if "query" in obj and "positive" in obj:
        return "pairs"
    return None


def detect_format(first_line: bytes, filename: str) -> str | None:
    """Guess the format from the file's extension and, for JSON Lines, its first object.

    `.csv` is csv and `.txt` is text whatever they hold. `.jsonl`/`.json`/`.ndjson`,
    or any other file whose first line is a JSON object, is classified by that
    object's keys. None when the format cannot be told.
    """
    extension = _extension(filename)
    if extension == "csv":
        return "csv"
    if extension == "txt":
        return "text"
    line = first_line.removeprefix(_BOM).strip()
    if extension not in _JSONL_EXTENSIONS and not line.startswith(b"{"):
        return None
    try:
        obj = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    return _kind_from_keys(obj) if type(obj) is dict else None


# --- schema checks -------------------------------------------------------------------------


def _describe(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _text_problem(value: object) -> str:
    """Why `value` is not a non-empty string (only called when it is not)."""
    if value is _MISSING:
        return "is required"
    if not isinstance(value, str):
        return f"must be a string, got {_describe(value)}"
    return "must not be empty"


def _check_messages(messages: list[Any], path: str) -> _CheckResult:
    """Checks each message; returns the total content length or the first problem."""
    total = 0
    for index, message in enumerate(messages):
        if type(message) is not dict:
            return f"{path}[{index}]", f"must be an object, got {_describe(message)}"
        role = message.get("role", _MISSING)
        if type(role) is not str or role not in _ROLE_SET:
            got = "it is missing" if role is _MISSING else f"got {_short(role)}"
            return f"{path}[{index}].role", f"must be one of {', '.join(CHAT_ROLES)}; {got}"
        content = message.get("content", _MISSING)
        if type(content) is str:
            total += len(content)
            continue
        tool_calls = message.get("tool_calls")
        if (
            (content is None or content is _MISSING)
            and role == "assistant"
            and type(tool_calls) is list
            and tool_calls
        ):
            # A tool-calling turn: the calls are what the model learns.
            continue
        if content is None:
            return (
                f"{path}[{index}].content",
                "may be null only on an assistant message with tool_calls",
            )
        return f"{path}[{index}].content", _text_problem(content)
    return total


def _chat_check(
    report: ValidationReport,
) -> tuple[Callable[[dict[str, Any]], _CheckResult], Callable[[], None]]:
    """The chat row check, and a function that writes its role counts to the report."""
    # The fast path handles the common shape (string contents, known roles) in
    # one pass, with role counts in closure cells rather than a dict: per-row
    # cost is what decides how close validation gets to bare parsing. Anything
    # else, valid or not, goes to _chat_row, the reference implementation, which
    # also says exactly what is wrong.
    slow_roles = dict.fromkeys(CHAT_ROLES, 0)
    n_system = n_user = n_assistant = n_tool = 0

    def check(obj: dict[str, Any]) -> _CheckResult:
        nonlocal n_system, n_user, n_assistant, n_tool
        try:
            total = system = user = assistant = tool = 0
            for message in obj["messages"]:
                role = message["role"]
                content = message["content"]
                if type(content) is not str:
                    break
                total += len(content)
                if role == "assistant":
                    assistant += 1
                elif role == "user":
                    user += 1
                elif role == "system":
                    system += 1
                elif role == "tool":
                    tool += 1
                else:
                    break
            else:
                # Getting here means `messages` was a list: iterating a string or
                # an object yields strings, and indexing those raised TypeError.
                if assistant:
                    n_user += user
                    n_assistant += assistant
                    if system:
                        n_system += system
                    if tool:
                        n_tool += tool
                    return total
        except (KeyError, TypeError):
            # A missing key, or something that is not an object where one belongs.
            pass
        return _chat_row(obj, slow_roles)

    def finish() -> None:
        fast = {"system": n_system, "user": n_user, "assistant": n_assistant, "tool": n_tool}
        report.roles = {role: fast[role] + slow_roles[role] for role in CHAT_ROLES}

    return check, finish


def _chat_row(obj: dict[str, Any], roles: dict[str, int]) -> _CheckResult:
    messages = obj.get("messages", _MISSING)
    if type(messages) is not list:
        if messages is _MISSING:
            return "messages", "is required"
        return "messages", f"must be a list of messages, got {_describe(messages)}"
    if not messages:
        return "messages", "must not be empty"
    result = _check_messages(messages, "messages")
    if not isinstance(result, int):
        return result
    if not any(message["role"] == "assistant" for message in messages):
        return "messages", "needs at least one assistant message to learn from"
    for message in messages:
        roles[message["role"]] += 1
    return result


def _prompt_completion_check(obj: dict[str, Any]) -> _CheckResult:
    prompt = obj.get("prompt", _MISSING)
    if type(prompt) is not str or not prompt or prompt.isspace():
        return "prompt", _text_problem(prompt)
    completion = obj.get("completion", _MISSING)
    if type(completion) is not str or not completion or completion.isspace():
        return "completion", _text_problem(completion)
    return len(prompt) + len(completion)


def _preference_check(obj: dict[str, Any]) -> _CheckResult:
    # The prompt is a string or a conversation so far; `messages` is accepted
    # in place of `prompt` for the conversation form.
    key = "prompt" if "prompt" in obj or "messages" not in obj else "messages"
    prompt = obj.get(key, _MISSING)
    if type(prompt) is list:
        if not prompt:
            return key, "must not be empty"
        prompt_length = _check_messages(prompt, key)
        if type(prompt_length) is not int:
            return prompt_length
    elif type(prompt) is not str or not prompt or prompt.isspace():
        if prompt is _MISSING or type(prompt) is str:
            return key, _text_problem(prompt)
        return key, f"must be a string or a list of messages, got {_describe(prompt)}"
    else:
        prompt_length = len(prompt)
    chosen = obj.get("chosen", _MISSING)
    if type(chosen) is not str or not chosen or chosen.isspace():
        return "chosen", _text_problem(chosen)
    rejected = obj.get("rejected", _MISSING)
    if type(rejected) is not str or not rejected or rejected.isspace():
        return "rejected", _text_problem(rejected)
    if chosen == rejected:
        return "rejected", "must differ from chosen"
    return prompt_length + len(chosen) + len(rejected)


def _classification_check(labels: dict[str, int]) -> Callable[[dict[str, Any]], _CheckResult]:
    def check(obj: dict[str, Any]) -> _CheckResult:
        text = obj.get("text", _MISSING)
        if type(text) is not str or not text or text.isspace():
            return "text", _text_problem(text)
        label = obj.get("label", _MISSING)
        # type() rather than isinstance(): True is an int, but not a label.
        if type(label) is int:
            key = str(label)
        elif type(label) is str and label and not label.isspace():
            key = label
        elif label is _MISSING:
            return "label", "is required"
        elif type(label) is str:
            return "label", "must not be empty"
        else:
            return "label", f"must be a string or an integer, got {_describe(label)}"
        if key in labels:
            labels[key] += 1
        elif len(labels) < MAX_LABELS:
            labels[key] = 1
        else:
            labels[OTHER_LABEL] = labels.get(OTHER_LABEL, 0) + 1
        return len(text)

    return check


def _pairs_check(obj: dict[str, Any]) -> _CheckResult:
    """A query and the passage it should retrieve (sentence-transformers' anchor/positive
    pairs): two non-empty strings of at most MAX_PAIR_TEXT_CHARS characters."""
    total = 0
    for name in ("query", "positive"):
        value = obj.get(name, _MISSING)
        if type(value) is not str or not value or value.isspace():
            return name, _text_problem(value)
        if len(value) > MAX_PAIR_TEXT_CHARS:
            return (
                name,
                f"must be at most {MAX_PAIR_TEXT_CHARS} characters, got {len(value)} (an "
                "embedding model reads a passage, not a document: split it)",
            )
        total += len(value)
    return total


# --- the validators ---------------------------------------------------------------------------


class _Errors:
    def __init__(self, report: ValidationReport, max_errors: int) -> None:
        self._report = report
        self._max = max_errors

    def add(self, line: int, field: str | None, reason: str) -> None:
        self._report.error_count += 1
        if len(self._report.errors) < self._max:
            self._report.errors.append(LineError(line, field, reason))


def _utf8_problem(line: bytes) -> str | None:
    try:
        line.decode("utf-8")
    except UnicodeDecodeError as exc:
        return f"not valid UTF-8: byte 0x{line[exc.start]:02x} at column {exc.start + 1}"
    return None


def _json_problem(line: bytes, exc: orjson.JSONDecodeError, *, last_unterminated: bool) -> str:
    utf8 = _utf8_problem(line)
    if utf8 is not None:
        return utf8
    reason = f"invalid JSON at column {exc.pos + 1}: {exc.msg}"
    if last_unterminated:
        return f"truncated last line (no newline at the end of the file): {reason}"
    return reason


def _unknown_kind(obj: dict[str, Any]) -> str:
    keys = ", ".join(_short(key) for key in list(obj)[:10]) or "none"
    return (
        f"cannot tell the dataset format from this object's keys ({keys}); expected "
        "messages (chat), prompt+completion, prompt+chosen+rejected (preference), "
        "text+label (classification) or query+positive (pairs)"
    )


def _validate_jsonl(
    batches: Iterable[tuple[int, list[bytes | None]]],
    reader: _LineReader,
    report: ValidationReport,
    errors: _Errors,
    too_long: str,
) -> None:
    loads = orjson.loads
    decode_error = orjson.JSONDecodeError
    made = _make_check(report)
    check, finish = made if made is not None else (None, _no_finish)
    lengths: list[int] = []
    for first, lines in batches:
        line_no = first - 1
        for line in lines:
            line_no += 1
            if line is None:
                errors.add(line_no, None, too_long)
                continue
            try:
                obj = loads(line)
            except decode_error as exc:
                # Blank lines land here too: orjson refuses an empty document.
                if not line.strip():
                    report.blank_lines += 1
                    continue
                reason = _json_problem(line, exc, last_unterminated=reader.unterminated)
                errors.add(line_no, None, reason)
                continue
            if type(obj) is not dict:
                reason = f"expected a JSON object, got {_describe(obj)}"
                if type(obj) is list:
                    reason += " (JSON Lines holds one object per line, not one array of them)"
                errors.add(line_no, None, reason)
                continue
            if check is None:
                # Still looking for the format: the first object whose keys tell it wins.
                report.format = _kind_from_keys(obj)
                made = _make_check(report)
                if made is None:
                    errors.add(line_no, None, _unknown_kind(obj))
                    continue
                check, finish = made
            result = check(obj)
            if type(result) is int:
                lengths.append(result)
            else:
                field_name, reason = result  # type: ignore[misc]
                errors.add(line_no, field_name, reason)
        # Once per chunk: keeps the per-row work to an append.
        report.rows += len(lengths)
        report.lengths.add_many(lengths)
        lengths = []
    finish()


def _no_finish() -> None:
    return None


def _make_check(
    report: ValidationReport,
) -> tuple[Callable[[dict[str, Any]], _CheckResult], Callable[[], None]] | None:
    """The row check for the report's format and what to run once all rows are seen."""
    if report.format == "chat":
        return _chat_check(report)
    if report.format == "prompt_completion":
        return _prompt_completion_check, _no_finish
    if report.format == "preference":
        return _preference_check, _no_finish
    if report.format == "classification":
        report.label_counts = {}
        return _classification_check(report.label_counts), _no_finish
    if report.format == "pairs":
        return _pairs_check, _no_finish
    return None


def _text_lines(
    lines: Iterable[tuple[int, bytes | None]],
    report: ValidationReport,
    errors: _Errors,
    too_long: str,
) -> Iterator[tuple[int, str]]:
    """Decoded, non-blank lines; too-long and invalid UTF-8 lines become errors."""
    for line_no, line in lines:
        if line is None:
            errors.add(line_no, None, too_long)
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            errors.add(line_no, None, _utf8_problem(line) or "not valid UTF-8")
            continue
        if not text or text.isspace():
            report.blank_lines += 1
            continue
        yield line_no, text


def _split_csv(text: str) -> list[str]:
    if '"' not in text:
        # Without quotes the excel dialect is exactly a split on commas.
        return text.split(",")
    return next(csv.reader((text,), strict=True))


def _validate_csv(
    lines: Iterable[tuple[int, bytes | None]],
    report: ValidationReport,
    errors: _Errors,
    too_long: str,
) -> None:
    width = 0
    lengths: list[int] = []
    for line_no, text in _text_lines(lines, report, errors, too_long):
        try:
            cells = _split_csv(text)
        except csv.Error as exc:
            reason = str(exc)
            if "unexpected end of data" in reason:
                reason = "unterminated quoted field: close the quote (a field may not span lines)"
            errors.add(line_no, None, f"malformed CSV: {reason}")
            continue
        if report.columns is None:
            report.columns = cells
            width = len(cells)
            _check_header(line_no, cells, errors)
            continue
        if len(cells) != width:
            errors.add(line_no, None, f"row has {len(cells)} fields but the header has {width}")
            continue
        lengths.append(sum(map(len, cells)))
        if len(lengths) >= _LENGTH_BATCH:
            report.rows += len(lengths)
            report.lengths.add_many(lengths)
            lengths = []
    report.rows += len(lengths)
    report.lengths.add_many(lengths)


def _check_header(line_no: int, columns: list[str], errors: _Errors) -> None:
    seen: set[str] = set()
    for index, name in enumerate(columns):
        if not name.strip():
            errors.add(line_no, None, f"header column {index + 1} has no name")
            return
        if name in seen:
            errors.add(line_no, name, "duplicate column name in the header")
            return
        seen.add(name)


def _validate_text(
    lines: Iterable[tuple[int, bytes | None]],
    report: ValidationReport,
    errors: _Errors,
    too_long: str,
) -> None:
    lengths: list[int] = []
    for _line_no, text in _text_lines(lines, report, errors, too_long):
        lengths.append(len(text))
        if len(lengths) >= _LENGTH_BATCH:
            report.rows += len(lengths)
            report.lengths.add_many(lengths)
            lengths = []
    report.rows += len(lengths)
    report.lengths.add_many(lengths)


def validate_stream(
    stream: BinaryIO,
    *,
    filename: str,
    format: str | None = None,
    max_errors: int = 100,
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
) -> ValidationReport:
    """Validate a training file line by line, in constant memory.

    `format` None means detect it: by extension for `.csv` and `.txt`, by the
    first object's keys for JSON Lines. The stream is read to its end (so
    `bytes` is the file's size) unless the format cannot be told at all.
    """
    if format is not None and format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; expected one of {', '.join(FORMATS)}")
    if max_errors < 0:
        raise ValueError("max_errors must not be negative")
    reader = _LineReader(stream, max_line_bytes=max_line_bytes, chunk_size=CHUNK_BYTES)
    report = ValidationReport(format=format)
    errors = _Errors(report, max_errors)
    too_long = f"line too long: more than {max_line_bytes} bytes (the rest of it was skipped)"
    batches: Iterable[tuple[int, list[bytes | None]]] = reader.batches()

    if format is None:
        extension = _extension(filename)
        if extension == "csv":
            report.format = "csv"
        elif extension == "txt":
            report.format = "text"
        elif extension not in _JSONL_EXTENSIONS:
            # Unknown extension: JSON Lines if the first line holds an object.
            batches, first = _peek_first(batches, report)
            if first is not None and not first.lstrip().startswith(b"{"):
                report.bytes = reader.bytes_read
                errors.add(
                    0,
                    None,
                    f"cannot tell the format of {filename!r}: name it .jsonl, .csv or "
                    ".txt, or choose a format",
                )
                return report

    if report.format == "csv":
        _validate_csv(_each_line(batches), report, errors, too_long)
    elif report.format == "text":
        _validate_text(_each_line(batches), report, errors, too_long)
    else:
        _validate_jsonl(batches, reader, report, errors, too_long)

    report.bytes = reader.bytes_read
    if report.rows == 0 and report.error_count == 0:
        if reader.bytes_read == 0:
            errors.add(0, None, "file is empty")
        elif report.format == "csv" and report.columns is not None:
            errors.add(0, None, "file has a header but no rows")
        else:
            errors.add(0, None, "file has no rows, only blank lines")
    return report


def _each_line(
    batches: Iterable[tuple[int, list[bytes | None]]],
) -> Iterator[tuple[int, bytes | None]]:
    for first, lines in batches:
        yield from enumerate(lines, start=first)


def _peek_first(
    batches: Iterable[tuple[int, list[bytes | None]]], report: ValidationReport
) -> tuple[Iterator[tuple[int, list[bytes | None]]], bytes | None]:
    """The first non-blank line (None if there is none, or it is too long to look at),
    and the batches again from the one holding it.

    Batches of nothing but blank lines are counted here and dropped, so a file
    of a million blank lines costs no memory.
    """
    iterator = iter(batches)
    for batch in iterator:
        for line in batch[1]:
            if line is None or line.strip():

                def replay(
                    batch: tuple[int, list[bytes | None]] = batch,
                ) -> Iterator[tuple[int, list[bytes | None]]]:
                    yield batch
                    yield from iterator

                return replay(), line
        report.blank_lines += len(batch[1])
    return iterator, None
