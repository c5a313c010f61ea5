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
4. drop exact duplicates, then near-duplicates (MinHash + LSH); the first
   occurrence is kept.

Scrubbing comes before de-duplication so that the output holds no two equal
rows even when they differed only in an email address. `pii_found` counts what
was replaced in the rows written, so it matches the placeholders in the new
version.

Memory: exact de-duplication keeps a 16-byte BLAKE2b digest per distinct row in
a set, about 90 bytes per row in CPython (10 million rows: ~0.9 GB).
Near-duplicate detection keeps one 64-bit key per LSH band per kept row (5 bands
at the default 0.9 threshold), about 350 bytes per row (1 million rows:
~350 MB; datasketch's MinHashLSH needs ~2 KB). Everything else streams.
"""

from __future__ import annotations

import csv
import hashlib
import io
import re
import unicodedata
import zlib
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, fields
from functools import lru_cache
from typing import Any, BinaryIO, Final

import numpy as np
import orjson
from datasketch import MinHash, MinHashLSH

from .validation import DEFAULT_MAX_LINE_BYTES, FORMATS, iter_lines

REMOVAL_REASONS: Final = ("empty", "too_long", "exact_duplicate", "near_duplicate")
PII_KINDS: Final = ("email", "phone", "card", "iban", "ssn", "ip_address")

#: MinHash permutations. 128 keeps the Jaccard estimate's standard error near
#: 0.03 at the thresholds people use (0.8-0.95); 64 doubles it.
NUM_PERM: Final = 128
_MINHASH_SEED: Final = 1
#: Rows hashed together in one numpy pass. 32 keeps the (perm x shingle) matrix of
#: long rows near the L2 cache: +19% rows/s on ~300-word chat rows against 128, with
#: the same rows removed (bench/ingest.py).
_NEAR_BATCH: Final = 32
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


# --- near-duplicates ------------------------------------------------------------------------

_MASK32: Final = np.uint64(0xFFFFFFFF)
_MIX_1: Final = np.uint64(0x9E3779B97F4A7C15)
_MIX_2: Final = np.uint64(0xC2B2AE3D27D4EB4F)
_MIX_3: Final = np.uint64(0x165667B19E3779F9)
_FMIX64: Final = (np.uint64(33), np.uint64(0xFF51AFD7ED558CCD), np.uint64(0xC4CEB9FE1A85EC53))
_FMIX32: Final = (np.uint32(16), np.uint32(0x85EBCA6B), np.uint32(13), np.uint32(0xC2B2AE35))


def _fmix64(values: np.ndarray) -> np.ndarray:
    shift, first, second = _FMIX64
    values = values ^ (values >> shift)
    values *= first
    values ^= values >> shift
    values *= second
    values ^= values >> shift
    return values


def _fmix32(values: np.ndarray) -> np.ndarray:
    # datasketch's premix for its "affine32" scheme, copied so results match it bit for bit.
    s1, m1, s2, m2 = _FMIX32
    values = values ^ (values >> s1)
    values *= m1
    values ^= values >> s2
    values *= m2
    values ^= values >> s1
    return values


def _crc32_table() -> np.ndarray:
    table = np.arange(256, dtype=np.uint32)
    for _ in range(8):
        table = np.where(table & 1, (table >> 1) ^ np.uint32(0xEDB88320), table >> 1)
    return table.astype(np.uint32)


_CRC32_TABLE: Final = _crc32_table()
#: Words longer than this (rare: URLs, base64) get zlib.crc32 one by one instead of
#: one numpy step per byte position.
_VECTOR_WORD_BYTES: Final = 32


def word_crcs(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """zlib.crc32 of each word in `text.lower().encode().split()` of every text, and the counts.

    Equal to mapping zlib.crc32 over the split words, but without a bytes object and a
    call per word: the batch is encoded once, words are found with numpy, and a
    table-driven CRC-32 runs over all words at once, one byte position per step
    (words sorted by length, so each step is a slice of the ones still going).
    """
    parts = [text.lower().encode() for text in texts]
    # Rows are joined with a space, so no word crosses from one row into the next.
    data = np.frombuffer(b" ".join(parts), dtype=np.uint8)
    # bytes.split() splits on b" \t\n\x0b\x0c\r" (9-13 and 32) and nothing else.
    space = data == 32
    space |= (data - np.uint8(9)) < np.uint8(5)
    in_word = np.zeros(len(data) + 2, dtype=np.int8)
    np.logical_not(space, out=in_word[1:-1], casting="unsafe")
    edges = np.diff(in_word)
    starts = np.flatnonzero(edges == 1)
    lengths = np.flatnonzero(edges == -1) - starts
    spans = np.fromiter(map(len, parts), dtype=np.int64, count=len(parts)) + 1
    row_starts = np.cumsum(spans) - spans
    counts = np.diff(np.searchsorted(starts, row_starts), append=len(starts)).astype(np.int64)
    # Sorted by length (a radix sort on 8-bit keys), the words still going at
    # each byte position are a suffix of the order.
    order = np.argsort(np.minimum(lengths, 255).astype(np.uint8), kind="stable")
    sorted_lengths = lengths[order]
    pointers = starts[order]
    crcs = np.full(len(starts), np.uint32(0xFFFFFFFF), dtype=np.uint32)
    low_bytes = crcs.view(np.uint8)[:: crcs.itemsize] if np.little_endian else None
    vector_end = int(np.searchsorted(sorted_lengths, _VECTOR_WORD_BYTES, side="right"))
    longest = int(sorted_lengths[vector_end - 1]) if vector_end else 0
    firsts = np.searchsorted(sorted_lengths[:vector_end], np.arange(longest), side="right")
    table = _CRC32_TABLE
    for first in firsts.tolist():
        crc = crcs[first:vector_end]
        pointer = pointers[first:vector_end]
        index = data[pointer]
        if low_bytes is not None:
            index ^= low_bytes[first:vector_end]
        else:
            index ^= (crc & np.uint32(0xFF)).astype(np.uint8)
        pointer += 1
        crc >>= np.uint32(8)
        crc ^= table[index]
    crcs = ~crcs
    if vector_end < len(starts):
        buffer = data.tobytes()
        for position in range(vector_end, len(starts)):
            start = int(pointers[position])
            crcs[position] = zlib.crc32(buffer[start : start + int(sorted_lengths[position])])
    result = np.empty_like(crcs)
    result[order] = crcs
    return result, counts


def shingle_hashes(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """32-bit hashes of each text's word 3-shingles, flattened, and the count per text.

    Words are lower-cased, split on whitespace; a text of one or two words is
    one shingle, an empty text has none. Words are hashed with CRC-32 (see
    `word_crcs`) and combined into shingles with numpy. Deterministic across
    processes, so the same input always gives the same output version.
    """
    crcs, counts = word_crcs(texts)
    word = crcs.astype(np.uint64)
    ends = np.cumsum(counts)
    starts = ends - counts
    row_end = np.repeat(ends, counts)
    position = np.arange(len(word))
    second = np.zeros_like(word)
    second[:-1] = word[1:]
    second[position + 1 >= row_end] = 0
    third = np.zeros_like(word)
    third[:-2] = word[2:]
    third[position + 2 >= row_end] = 0
    combined = _fmix64(word * _MIX_1 + second * _MIX_2 + third * _MIX_3) & _MASK32
    # A shingle starts at each word that has two more after it, or at the
    # first word of a short text.
    keep = position < np.maximum(np.repeat(starts, counts) + 1, row_end - 2)
    shingles = np.maximum(np.minimum(counts, 1), counts - 2)
    return combined[keep].astype(np.uint32), shingles


@lru_cache(maxsize=1)
def _permutations() -> tuple[np.ndarray, np.ndarray]:
    a, b = MinHash(num_perm=NUM_PERM, seed=_MINHASH_SEED, scheme="affine32").permutations
    return a.astype(np.uint32)[:, None], b.astype(np.uint32)[:, None]


def minhash_signatures(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """MinHash signatures (one row per text, NUM_PERM uint32 columns) for a batch.

    Bit for bit what `datasketch.MinHash(num_perm=NUM_PERM, seed=1,
    scheme="affine32")` gives when updated with `shingle_hashes`, but the
    whole batch is one numpy pass instead of a MinHash object and its numpy
    calls per row. Also returns a mask of the texts that had any shingle.
    """
    hashes, counts = shingle_hashes(texts)
    has_shingles = counts > 0
    signatures = np.full((len(texts), NUM_PERM), np.uint32(0xFFFFFFFF), dtype=np.uint32)
    if not len(hashes):
        return signatures, has_shingles
    a, b = _permutations()
    permuted = a * _fmix32(hashes)[None, :]  # (NUM_PERM, shingles), wraps mod 2**32
    permuted += b
    starts = (np.cumsum(counts) - counts)[has_shingles]
    signatures[has_shingles] = np.minimum.reduceat(permuted, starts, axis=1).T
    return signatures, has_shingles


@lru_cache(maxsize=16)
def lsh_bands(threshold: float) -> tuple[int, int]:
    """(bands, rows per band) datasketch's MinHashLSH picks for `threshold`."""
    index = MinHashLSH(threshold=threshold, num_perm=NUM_PERM)
    return index.b, index.r


class NearDuplicates:
    """MinHash LSH over the rows seen so far: keeps the first, flags later look-alikes.

    The banding is datasketch's MinHashLSH's (same band count and width for the
    threshold), but each band is stored as one 64-bit hash in a set rather than
    as MinHashLSH's byte strings plus its key table (~350 bytes per row instead
    of ~2 KB), and a whole batch is hashed at once. As in MinHashLSH, a shared
    band is the verdict; there is no second check against stored signatures
    (that would need 512 more bytes per row).
    """

    def __init__(self, threshold: float) -> None:
        self.bands, self.rows_per_band = lsh_bands(threshold)
        # One set for all bands (each band hashes with its own multipliers), so
        # a row is one isdisjoint() and one update(), both in C.
        self._seen: set[int] = set()
        # Two independent multilinear hashes per band, keeping the high 32 bits
        # of each: strongly universal (Lemire and Kaser, 2016), so two
        # different bands share a 64-bit key with probability 2**-64.
        generator = np.random.default_rng(_MINHASH_SEED)
        shape = (2, self.bands, self.rows_per_band)
        self._multipliers = generator.integers(0, 2**64, size=shape, dtype=np.uint64)
        self._offsets = generator.integers(0, 2**64, size=(2, self.bands), dtype=np.uint64)

    def _band_keys(self, signatures: np.ndarray) -> list[list[int]]:
        width = self.bands * self.rows_per_band
        banded = (
            signatures[:, :width]
            .astype(np.uint64)
            .reshape(len(signatures), self.bands, self.rows_per_band)
        )
        high, low = (
            ((banded * multipliers).sum(axis=2, dtype=np.uint64) + offsets) >> np.uint64(32)
            for multipliers, offsets in zip(self._multipliers, self._offsets, strict=True)
        )
        return ((high << np.uint64(32)) | low).tolist()  # type: ignore[no-any-return]

    def filter(self, texts: list[str]) -> list[bool]:
        """For each text in order: True to keep it, False if it nearly repeats an earlier one.

        Texts kept are remembered; texts without words are always kept.
        """
        signatures, has_shingles = minhash_signatures(texts)
        keep: list[bool] = []
        seen = self._seen
        band_keys = self._band_keys(signatures)
        for row_keys, hashed in zip(band_keys, has_shingles.tolist(), strict=True):
            if not hashed:
                keep.append(True)
            elif seen.isdisjoint(row_keys):
                seen.update(row_keys)
                keep.append(True)
            else:
                keep.append(False)
        return keep


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
    """prompt_completion and classification: flat string fields."""

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
    # Rows waiting for a near-duplicate verdict: (row, text to compare, PII found, normalised?).
    pending: list[tuple[Any, str, Counter[str], bool]] = []

    def emit(row: Any, found: Counter[str], changed: bool) -> None:
        output.write(adapter.dump(row))
        report.rows_out += 1
        report.rows_normalized += changed
        for kind, count in found.items():
            report.pii_found[kind] += count

    def flush_near() -> None:
        assert near is not None
        verdicts = near.filter([text for _, text, _, _ in pending])
        for (row, _, found, changed), keep in zip(pending, verdicts, strict=True):
            if keep:
                emit(row, found, changed)
            else:
                report.removed["near_duplicate"] += 1
        pending.clear()

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
            emit(row, found, normalized)
            continue
        pending.append((row, "\n".join(texts), found, normalized))
        if len(pending) >= _NEAR_BATCH:
            flush_near()
    if pending:
        flush_near()
    output.flush()
    return report
