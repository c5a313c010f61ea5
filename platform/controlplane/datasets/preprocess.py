"""Cleaning steps that turn a validated dataset version into a new one.

A pure library over binary streams, like `validation`: no Django, nothing from
the control plane, so the dataset-processing Celery task runs it between two
storage objects and the tests run it between two `BytesIO`.

Steps, each switched by a `Recipe` option, in this order for every row:

1. normalise: Unicode NFC, invisible/control characters dropped, whitespace
   collapsed (see `normalize_text`);
2. scrub PII: emails, phone numbers, card numbers (Luhn-checked), IBANs
   (mod-97-checked), US social security numbers and IPv4 addresses become
   typed placeholders such as `[EMAIL]`;
3. drop empty rows, then rows longer than `max_chars` characters;
4. drop exact duplicates, then near-duplicates (MinHash + LSH over word
   3-shingles, see `neardup`); the first occurrence is kept.

Scrubbing comes before de-duplication so that the output holds no two equal
rows even when they differed only in an email address. `pii_found` counts what
was replaced in the rows written, so it matches the placeholders in the new
version.

Memory: exact de-duplication keeps a 16-byte BLAKE2b digest per distinct row in
a set, about 90 bytes per row in CPython (10 million rows: ~0.9 GB).
Near-duplicate detection keeps one 64-bit key per LSH band per kept row (5 bands
at the default 0.9 threshold), about 350 bytes per row (1 million rows:
~350 MB; datasketch's MinHashLSH needs ~2 KB). Everything else streams; rows
wait for their near-duplicate verdict in batches of ~512 K characters.
"""

from __future__ import annotations

import csv
import hashlib
import io
import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any, BinaryIO, Final

import orjson

from .neardup import BATCH_CHARS, NearDuplicates
from .validation import DEFAULT_MAX_LINE_BYTES, FORMATS, iter_lines

REMOVAL_REASONS: Final = ("empty", "too_long", "exact_duplicate", "near_duplicate")
PII_KINDS: Final = ("email", "phone", "card", "iban", "ssn", "ip_address")

#: Rows waiting for a near-duplicate verdict go to `NearDuplicates.filter` once their
#: texts hold `neardup.BATCH_CHARS` characters (one numpy pass: ~320 chat rows of
#: ~1.6 KB) or once there are this many of them (short rows).
_NEAR_BATCH_ROWS: Final = 4096
_WRITE_BUFFER_BYTES: Final = 1024 * 1024
# Shared, never written to: what a row without PII carries.
_NO_PII: Final[Counter[str]] = Counter()


class PreprocessError(ValueError):
    """The input is not a valid dataset of the given format (validate it first)."""

    def __init__(self, line: int, reason: str) -> None:
        super().__init__(f"line {line}: {reason}")
        self.line = line
        self.reason = reason


# --- recipe and report --------------------------------------------------------------


@dataclass(frozen=True)
class Recipe:
    """Which cleaning steps to run. Defaults: normalise, drop empty, exact dedupe."""

    normalize: bool = True
    #: Drop rows a needed field of which is empty after cleaning (chat: no
    #: assistant turn with content or tool calls left; CSV: every cell empty).
    drop_empty: bool = True
    #: Drop rows whose text fields total more characters than this, after cleaning.
    max_chars: int | None = None
    dedupe_exact: bool = True
    dedupe_near: bool = False
    #: Estimated Jaccard similarity of word 3-shingles above which a row is a near-duplicate.
    near_threshold: float = 0.9
    scrub_pii: bool = False

    def __post_init__(self) -> None:
        for name in ("normalize", "drop_empty", "dedupe_exact", "dedupe_near", "scrub_pii"):
            if type(getattr(self, name)) is not bool:
                raise ValueError(f"{name} must be true or false")
        max_chars = self.max_chars
        if max_chars is not None and (type(max_chars) is not int or max_chars < 1):
            raise ValueError("max_chars must be a positive integer or null")
        threshold = self.near_threshold
        if type(threshold) not in (int, float) or not 0 < threshold < 1:
            raise ValueError("near_threshold must be a number between 0 and 1 (exclusive)")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Recipe:
        """Build a recipe from JSON; missing options take their defaults."""
        if not isinstance(data, Mapping):
            raise ValueError("recipe must be an object")
        known = [f.name for f in fields(cls)]
        unknown = sorted(str(key) for key in data if key not in known)
        if unknown:
            raise ValueError(
                f"unknown recipe option(s): {', '.join(unknown)}; known options: {', '.join(known)}"
            )
        return cls(**data)


def _zeros(keys: tuple[str, ...]) -> dict[str, int]:
    return dict.fromkeys(keys, 0)


@dataclass
class PreprocessReport:
    rows_in: int = 0
    rows_out: int = 0
    removed: dict[str, int] = field(default_factory=lambda: _zeros(REMOVAL_REASONS))
    pii_found: dict[str, int] = field(default_factory=lambda: _zeros(PII_KINDS))
    #: Rows written whose text normalisation changed.
    rows_normalized: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "rows_in": self.rows_in,
            "rows_out": self.rows_out,
            "removed": dict(self.removed),
            "pii_found": dict(self.pii_found),
            "rows_normalized": self.rows_normalized,
        }


# --- normalisation ----------------------------------------------------------------------

# C0/C1 controls except tab and newline (CR is handled first), DEL, and the
# invisible characters that only ever get in the way: zero-width space, word
# joiner, byte-order mark. ZWJ/ZWNJ stay: emoji sequences and Persian and Indic
# scripts need them.
_INVISIBLE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b\u2060\ufeff]")
_BLANK_LINES = re.compile(r"\n{3,}")


def normalize_text(text: str, *, single_line: bool = False) -> str:
    """NFC, invisible characters dropped, whitespace collapsed, ends stripped.

    NFC rather than NFKC: NFKC folds compatibility characters ("x²" -> "x2",
    "ﬁ" -> "fi", full-width forms -> ASCII), which rewrites maths, code and CJK
    text the model should learn as written; NFC only unifies composed and
    decomposed spellings of the same character.

    Within each line, runs of whitespace between words become one space and
    trailing whitespace goes, but indentation stays, so code survives; more
    than one blank line in a row becomes one. With `single_line` (text lines,
    CSV cells) line breaks are whitespace like any other.
    """
    if not text.isascii():
        text = unicodedata.normalize("NFC", text)
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _INVISIBLE.sub("", text)
    if single_line or "\n" not in text:
        # str.split() without arguments already splits on every Unicode space.
        return " ".join(text.split())
    lines = []
    for line in text.split("\n"):
        words = line.split()
        if words:
            indent = line[: len(line) - len(line.lstrip())]
            lines.append(indent + " ".join(words))
        else:
            lines.append("")
    return _BLANK_LINES.sub("\n\n", "\n".join(lines)).strip()


# --- PII --------------------------------------------------------------------------------------

_DIGIT = re.compile(r"[0-9]")
# Bounded repetitions keep matching linear on pathological input.
_EMAIL = re.compile(
    r"(?<![\w.%+-])[A-Za-z0-9._%+-]{1,64}@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.){1,8}"
    r"[A-Za-z]{2,24}\b"
)
_IBAN = re.compile(r"\b[A-Z]{2}[0-9]{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,4})?\b")
_CARD = re.compile(r"(?<![0-9])[0-9](?:[ -]?[0-9]){12,18}(?![0-9])")
_SSN = re.compile(r"(?<![0-9-])([0-9]{3})-([0-9]{2})-([0-9]{4})(?![0-9-])")
_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_IPV4 = re.compile(rf"(?<![0-9.])(?:{_OCTET}\.){{3}}{_OCTET}(?!\.?[0-9])")
_PHONE = re.compile(
    r"(?<![\w+])(?:"
    r"(?P<intl>\+[0-9]{1,3}[ .-]?(?:\([0-9]{1,4}\)[ .-]?)?[0-9]{1,4}(?:[ .-]?[0-9]{1,4}){1,5})"
    r"|(?P<nanp>(?:\([0-9]{3}\) ?|[0-9]{3}[.-])[0-9]{3}[.-][0-9]{4})"
    r"|(?P<trunk>0[1-9][0-9]{0,3}(?:[ .-][0-9]{2,4}){2,4})"
    r")(?![\w])"
)
_NON_DIGITS = re.compile(r"[^0-9]")


def _luhn_valid(digits: str) -> bool:
    total = 0
    for index, char in enumerate(reversed(digits)):
        value = ord(char) - 48
        if index % 2:
            value *= 2
            if value > 9:
                value -= 9
        total += value
    return total % 10 == 0


def _iban_valid(compact: str) -> bool:
    if not 15 <= len(compact) <= 34:
        return False
    rearranged = compact[4:] + compact[:4]
    return int("".join(str(int(char, 36)) for char in rearranged)) % 97 == 1


def scrub_pii(text: str, counts: Counter[str]) -> str:
    """Replace PII with typed placeholders, counting each kind in `counts`.

    `[EMAIL]`, `[IBAN]` (mod-97 valid), `[CARD]` (13-19 digits, Luhn valid),
    `[SSN]` (US format, impossible area numbers excluded), `[IP_ADDRESS]`
    (IPv4, so four-part version numbers go too) and `[PHONE]` (international
    "+..." numbers, North American and trunk-prefixed "0..." national forms).
    Number patterns that fail their checksum are left alone: a random 16-digit
    id is not a card. Patterns run from the most to the least specific, so a
    card number is never half-eaten as a phone number.
    """
    if "@" in text:
        text = _EMAIL.sub(lambda match: _replace(counts, "email", "[EMAIL]"), text)
    if not _DIGIT.search(text):
        return text
    text = _IBAN.sub(lambda match: _iban(match, counts), text)
    text = _CARD.sub(lambda match: _card(match, counts), text)
    text = _SSN.sub(lambda match: _ssn(match, counts), text)
    text = _IPV4.sub(lambda match: _replace(counts, "ip_address", "[IP_ADDRESS]"), text)
    return _PHONE.sub(lambda match: _phone(match, counts), text)


def _replace(counts: Counter[str], kind: str, placeholder: str) -> str:
    counts[kind] += 1
    return placeholder


def _iban(match: re.Match[str], counts: Counter[str]) -> str:
    # The pattern is greedy and may have run into a following all-caps word
    # ("... 0130 00 THEN"): try shorter runs of groups before giving up.
    original = match.group(0)
    groups = list(re.finditer(r"[A-Z0-9]+", original))
    for end in range(len(groups), 0, -1):
        if _iban_valid("".join(group.group(0) for group in groups[:end])):
            counts["iban"] += 1
            return "[IBAN]" + original[groups[end - 1].end() :]
    return original


def _card(match: re.Match[str], counts: Counter[str]) -> str:
    digits = _NON_DIGITS.sub("", match.group(0))
    if len(set(digits)) > 1 and _luhn_valid(digits):
        counts["card"] += 1
        return "[CARD]"
    return match.group(0)


def _ssn(match: re.Match[str], counts: Counter[str]) -> str:
    area, group, serial = match.groups()
    if area in ("000", "666") or area[0] == "9" or group == "00" or serial == "0000":
        return match.group(0)
    counts["ssn"] += 1
    return "[SSN]"


def _phone(match: re.Match[str], counts: Counter[str]) -> str:
    digits = len(_NON_DIGITS.sub("", match.group(0)))
    # Trunk-prefixed national numbers need 9+ digits so dates ("01.02.2023") stay.
    low = 9 if match.lastgroup == "trunk" else 8
    if low <= digits <= 15:
        counts["phone"] += 1
        return "[PHONE]"
    return match.group(0)


# --- formats -----------------------------------------------------------------------------------

_Clean = Callable[[str], str]


class _Format:
    """How one format's rows are read, cleaned, compared and written."""

    single_line = False

    def parse(self, line_no: int, line: bytes) -> Any:
        try:
            row = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            raise PreprocessError(line_no, f"invalid JSON: {exc.msg}") from None
        if type(row) is not dict:
            raise PreprocessError(line_no, "expected a JSON object")
        return row

    def texts(self, row: Any, clean: _Clean | None) -> list[str]:
        """The row's text fields, after running `clean` over them in place."""
        raise NotImplementedError

    def is_empty(self, row: Any, texts: list[str]) -> bool:
        """Whether a field the row needs is empty; by default, any of them."""
        return not all(texts)

    def key(self, row: Any) -> bytes:
        raise NotImplementedError

    def dump(self, row: Any) -> bytes:
        return orjson.dumps(row, option=orjson.OPT_APPEND_NEWLINE)


def _clean_fields(row: dict[str, Any], names: tuple[str, ...], clean: _Clean | None) -> list[str]:
    texts = []
    for name in names:
        value = row.get(name)
        if type(value) is str:
            if clean is not None:
                row[name] = value = clean(value)
            texts.append(value)
    return texts


def _clean_messages(messages: object, clean: _Clean | None) -> list[str]:
    texts = []
    if type(messages) is list:
        for message in messages:
            if type(message) is dict and type(message.get("content")) is str:
                if clean is not None:
                    message["content"] = clean(message["content"])
                texts.append(message["content"])
    return texts


class _Chat(_Format):
    def texts(self, row: Any, clean: _Clean | None) -> list[str]:
        return _clean_messages(row.get("messages"), clean)

    def is_empty(self, row: Any, texts: list[str]) -> bool:
        # Empty when no assistant turn is left to learn from.
        for message in row.get("messages") or ():
            if (
                type(message) is dict
                and message.get("role") == "assistant"
                and (message.get("content") or message.get("tool_calls"))
            ):
                return False
        return True

    def key(self, row: Any) -> bytes:
        return orjson.dumps(row.get("messages"), option=orjson.OPT_SORT_KEYS)


class _Fields(_Format):
    """prompt_completion, classification and pairs: flat string fields."""

    def __init__(self, names: tuple[str, ...], key_names: tuple[str, ...]) -> None:
        self.names = names
        self.key_names = key_names

    def texts(self, row: Any, clean: _Clean | None) -> list[str]:
        return _clean_fields(row, self.names, clean)

    def is_empty(self, row: Any, texts: list[str]) -> bool:
        return len(texts) < len(self.names) or not all(texts)

    def key(self, row: Any) -> bytes:
        return orjson.dumps([row.get(name) for name in self.key_names])


class _Preference(_Format):
    def texts(self, row: Any, clean: _Clean | None) -> list[str]:
        key = "prompt" if "prompt" in row or "messages" not in row else "messages"
        if type(row.get(key)) is list:
            prompt = _clean_messages(row[key], clean)
        else:
            prompt = _clean_fields(row, (key,), clean)
        return prompt + _clean_fields(row, ("chosen", "rejected"), clean)

    def is_empty(self, row: Any, texts: list[str]) -> bool:
        prompt = row.get("prompt", row.get("messages"))
        if type(prompt) is list:
            prompt_empty = not any(_clean_messages(prompt, None))
        else:
            prompt_empty = not prompt
        return prompt_empty or not row.get("chosen") or not row.get("rejected")

    def key(self, row: Any) -> bytes:
        prompt = row.get("prompt", row.get("messages"))
        return orjson.dumps(
            [prompt, row.get("chosen"), row.get("rejected")], option=orjson.OPT_SORT_KEYS
        )


class _Text(_Format):
    single_line = True

    def parse(self, line_no: int, line: bytes) -> Any:
        # A one-item list, so that cleaning can replace the text in place.
        try:
            return [line.decode("utf-8")]
        except UnicodeDecodeError:
            raise PreprocessError(line_no, "not valid UTF-8") from None

    def texts(self, row: Any, clean: _Clean | None) -> list[str]:
        if clean is not None:
            row[0] = clean(row[0])
        return [row[0]]

    def key(self, row: Any) -> bytes:
        return row[0].encode()  # type: ignore[no-any-return]

    def dump(self, row: Any) -> bytes:
        return (row[0] + "\n").encode()  # type: ignore[no-any-return]


class _Csv(_Format):
    single_line = True

    def __init__(self) -> None:
        self.width: int | None = None

    def parse(self, line_no: int, line: bytes) -> Any:
        try:
            text = line.decode("utf-8")
            cells = next(csv.reader((text,), strict=True))
        except (UnicodeDecodeError, csv.Error) as exc:
            raise PreprocessError(line_no, f"malformed CSV row: {exc}") from None
        if self.width is not None and len(cells) != self.width:
            raise PreprocessError(
                line_no, f"row has {len(cells)} fields but the header has {self.width}"
            )
        return cells

    def texts(self, row: Any, clean: _Clean | None) -> list[str]:
        if clean is not None:
            row[:] = [clean(cell) for cell in row]
        return row  # type: ignore[no-any-return]

    def is_empty(self, row: Any, texts: list[str]) -> bool:
        return not any(texts)

    def key(self, row: Any) -> bytes:
        return orjson.dumps(row)

    def dump(self, row: Any) -> bytes:
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator="\n").writerow(row)
        return buffer.getvalue().encode()


def _format_for(name: str) -> _Format:
    if name == "chat":
        return _Chat()
    if name == "prompt_completion":
        return _Fields(("prompt", "completion"), ("prompt", "completion"))
    if name == "classification":
        # The label is part of the row's identity: the same text with two
        # labels is a conflict to surface, not a duplicate to hide.
        return _Fields(("text",), ("text", "label"))
    if name == "preference":
        return _Preference()
    if name == "pairs":
        # Both texts are the row: the same query with another positive is another pair.
        return _Fields(("query", "positive"), ("query", "positive"))
    if name == "text":
        return _Text()
    return _Csv()


# --- the pipeline ------------------------------------------------------------------------------


class _Output:
    def __init__(self, dst: BinaryIO) -> None:
        self._dst = dst
        self._parts: list[bytes] = []
        self._size = 0

    def write(self, data: bytes) -> None:
        self._parts.append(data)
        self._size += len(data)
        if self._size >= _WRITE_BUFFER_BYTES:
            self.flush()

    def flush(self) -> None:
        if self._parts:
            self._dst.write(b"".join(self._parts))
            self._parts = []
            self._size = 0


def _rows(src: BinaryIO, max_line_bytes: int) -> Iterator[tuple[int, bytes]]:
    for line_no, line in iter_lines(src, max_line_bytes=max_line_bytes):
        if line is None:
            raise PreprocessError(line_no, f"line longer than {max_line_bytes} bytes")
        if not line.strip():
            continue  # Blank lines are not rows (as in validation) and are not copied.
        yield line_no, line


def preprocess_stream(
    src: BinaryIO,
    dst: BinaryIO,
    *,
    format: str,
    recipe: Recipe,
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
) -> PreprocessReport:
    """Read a validated dataset from `src`, write the cleaned one (same format) to `dst`.

    Streams both ways; only the de-duplication indexes grow with the data (see
    the module docstring). Raises PreprocessError at the first row that does not
    parse, since the input is meant to have passed `validate_stream`.
    """
    if format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; expected one of {', '.join(FORMATS)}")
    adapter = _format_for(format)
    report = PreprocessReport()
    output = _Output(dst)
    single_line = adapter.single_line
    normalized = False

    def normalize(text: str) -> str:
        nonlocal normalized
        cleaned = normalize_text(text, single_line=single_line)
        if cleaned != text:
            normalized = True
        return cleaned

    # PII found in the current row; added to the report only if the row is written.
    pii: Counter[str] = Counter()

    def scrub(text: str) -> str:
        return scrub_pii(text, pii)

    def normalize_and_scrub(text: str) -> str:
        return scrub_pii(normalize(text), pii)

    clean: _Clean | None = None
    if recipe.normalize and recipe.scrub_pii:
        clean = normalize_and_scrub
    elif recipe.normalize:
        clean = normalize
    elif recipe.scrub_pii:
        clean = scrub

    seen: set[bytes] = set()
    near = NearDuplicates(recipe.near_threshold) if recipe.dedupe_near else None
    # Rows waiting for a near-duplicate verdict: (row as written, text to compare, PII
    # found, normalised?). Kept serialised: a batch holds ~320 chat rows.
    pending: list[tuple[bytes, str, Counter[str], bool]] = []
    pending_chars = 0

    def emit(line: bytes, found: Counter[str], changed: bool) -> None:
        output.write(line)
        report.rows_out += 1
        report.rows_normalized += changed
        for kind, count in found.items():
            report.pii_found[kind] += count

    def flush_near() -> None:
        nonlocal pending_chars
        assert near is not None
        verdicts = near.filter([text for _, text, _, _ in pending])
        for (dumped, _, found, changed), keep in zip(pending, verdicts, strict=True):
            if keep:
                emit(dumped, found, changed)
            else:
                report.removed["near_duplicate"] += 1
        pending.clear()
        pending_chars = 0

    lines = _rows(src, max_line_bytes)
    if isinstance(adapter, _Csv):
        # The header is copied as is; the rows are checked against its width.
        for line_no, line in lines:
            header = adapter.parse(line_no, line)
            adapter.width = len(header)
            output.write(adapter.dump(header))
            break

    for line_no, line in lines:
        row = adapter.parse(line_no, line)
        report.rows_in += 1
        normalized = False
        pii.clear()
        texts = adapter.texts(row, clean)
        if recipe.drop_empty and adapter.is_empty(row, texts):
            report.removed["empty"] += 1
            continue
        if recipe.max_chars is not None and sum(map(len, texts)) > recipe.max_chars:
            report.removed["too_long"] += 1
            continue
        if recipe.dedupe_exact:
            digest = hashlib.blake2b(adapter.key(row), digest_size=16).digest()
            if digest in seen:
                report.removed["exact_duplicate"] += 1
                continue
            seen.add(digest)
        found = Counter(pii) if pii else _NO_PII
        if near is None:
            emit(adapter.dump(row), found, normalized)
            continue
        text = "\n".join(texts)
        pending.append((adapter.dump(row), text, found, normalized))
        pending_chars += len(text)
        if pending_chars >= BATCH_CHARS or len(pending) >= _NEAR_BATCH_ROWS:
            flush_near()
    if pending:
        flush_near()
    output.flush()
    return report
