"""Near-duplicate detection: MinHash over word 3-shingles, LSH banding, a batch at a time.

A row is a near-duplicate of an earlier one when the estimated Jaccard
similarity of their sets of word 3-shingles passes a threshold. The pieces and
where they come from:

- words: `text.lower().encode().split()`; each word gets a 64-bit hash
  (`word_hashes`), three consecutive words one 32-bit shingle hash
  (`shingle_hashes`); a text of one or two words is one shingle;
- signatures: datasketch's `MinHash(num_perm=NUM_PERM, seed=1)` with its
  default "affine32" scheme, bit for bit, except that the permutations are
  `a * x` rather than `a * x + b` modulo 2**32 (`minhash_signatures` says why);
- banding: the (bands, rows per band) datasketch's `MinHashLSH` picks for the
  threshold (`lsh_bands`); a row sharing any band with a kept row is a
  near-duplicate, as in MinHashLSH (no second check against stored signatures).

Why not datasketch's own objects: `MinHash.bulk`/`update_batch` call the hash
function once per value in Python and run numpy once per row, and
`MinHashLSH.insert` stores byte strings per band plus a key table (~2 KB a
row). On the bench's ~300-word chat rows that is ~140 us a row for the
signatures and ~40 us for query + insert, even given our shingle hashes: ~5,500
rows/s. So the same arithmetic runs here over a whole batch of rows at once in
numpy (one flat array of shingle hashes plus per-row counts,
`np.minimum.reduceat` for each row's minima), and the index is one set of
64-bit band keys, about 350 bytes a kept row at the default threshold (5 bands).

Deterministic across processes and machines (no `hash()`, little-endian
reads), so the same input and recipe always give the same output version.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from functools import lru_cache
from typing import Final

import numpy as np
from datasketch import MinHash, MinHashLSH

#: MinHash permutations, as datasketch's default. They are about a third of the cost on
#: ~300-word rows, but fewer change the LSH curve: with 64 (datasketch's 3 bands of 21 at
#: 0.9; +30-38% rows/s) a pair at similarity 0.95 is caught 71% of the time instead of
#: 80%, at 0.98 96% instead of 99%, and 91.0% of the bench's injected near-duplicates
#: instead of 94.1% (bench/README.md).
NUM_PERM: Final = 128
_MINHASH_SEED: Final = 1
#: Texts hashed together: at most this many characters (and at least one text) per
#: numpy pass, so memory stays bounded whatever the rows. 512 Ki rather than 1 Mi:
#: with 1 Mi batches glibc handed the batch's freed arrays back to the kernel and the
#: next batch faulted them in again (3.7 page faults a row against 0.15; ~30,000 ->
#: ~40,000 rows/s interleaved A/B on ~300-word rows); 128-256 Ki measured the same.
BATCH_CHARS: Final = 512 * 1024
#: Shingles (whole texts) per MinHash step, and permutations per pass over them: a
#: 16 x 16384 uint32 work matrix, 1 MiB. From 8 x 32768 to 128 x 4096 measured the
#: same within the noise; fewer shingles per step pay numpy's per-call overhead.
_CHUNK_SHINGLES: Final = 16384
_PERM_BLOCK: Final = 16

_U64 = np.uint64
_SHIFT32: Final = _U64(32)
# Odd 64-bit constants (golden ratio, xxHash primes) for combining words.
_MIX_1: Final = _U64(0x9E3779B97F4A7C15)
_MIX_2: Final = _U64(0xC2B2AE3D27D4EB4F)
_MIX_3: Final = _U64(0x165667B19E3779F9)
_MIX_LENGTH: Final = _U64(0x27D4EB2F165667C5)
_FMIX64: Final = (_U64(33), _U64(0xFF51AFD7ED558CCD), _U64(0xC4CEB9FE1A85EC53))
_FMIX32: Final = (np.uint32(16), np.uint32(0x85EBCA6B), np.uint32(13), np.uint32(0xC2B2AE35))
_HIGH_BITS: Final = _U64(0x8080808080808080)
_PADDING: Final = b" " * 8
#: A signature's value for a text without shingles, as in datasketch.
_NO_SHINGLE: Final = np.uint32(0xFFFFFFFF)
#: _LOW_BYTES[k]: the low k bytes of a little-endian uint64 (k = 0..8).
_LOW_BYTES: Final = np.array([(1 << (8 * k)) - 1 for k in range(9)], dtype=np.uint64)
#: Words up to this many bytes are hashed in numpy, 8 bytes a step; longer ones (rare:
#: URLs, base64) with BLAKE2b one by one.
_VECTOR_WORD_BYTES: Final = 32
#: A text whose UTF-8 is at most this many bytes longer than its length in characters
#: has its few non-ASCII words lower-cased one by one; a longer one is lower-cased
#: whole (see `_lowered_utf8`).
_FEW_NON_ASCII_BYTES: Final = 24


def _fmix64(values: np.ndarray) -> np.ndarray:
    """MurmurHash3's 64-bit finaliser: a bijection that spreads every input bit."""
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


def _lowered_utf8(texts: list[str]) -> tuple[list[bytes], np.ndarray, np.ndarray]:
    """Each text as UTF-8, its size, and whether its non-ASCII words are still to lower-case.

    `str.lower()` costs ~5 ns a character on any text with a non-ASCII character in
    it (most chat rows: one accented name or emoji is enough), against ~0.2 ns for
    `bytes.lower()` over the batch, which lower-cases ASCII letters only. So a text
    with a few non-ASCII characters is encoded as is, and only its non-ASCII words
    are lower-cased as `str` afterwards (`_lower_non_ascii_words`); a text with many
    goes through `str.lower()` whole. Either way each word ends up as in
    `text.lower().encode().split()`: `str.lower()` maps character by character, its
    one context rule (final sigma) looks no further than the ASCII whitespace
    around the word, and UTF-8 never puts an ASCII byte inside a multi-byte character.
    """
    parts = [text.encode() for text in texts]
    sizes = np.fromiter(map(len, parts), dtype=np.int64, count=len(parts))
    extra = sizes - np.fromiter(map(len, texts), dtype=np.int64, count=len(texts))
    pending = extra > 0
    for index in np.flatnonzero(extra > _FEW_NON_ASCII_BYTES).tolist():
        parts[index] = texts[index].lower().encode()
        sizes[index] = len(parts[index])
        pending[index] = False
    return parts, sizes, pending


def _hash_words(
    buffer: bytes, starts: np.ndarray, lengths: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """A 64-bit hash of each word `buffer[start : start + length]`, and which are not ASCII.

    The word's bytes read as little-endian uint64s, 8 at a time straight from the
    buffer (through a 1-byte-stride view: no bytes object, no call per word), folded
    with a multiply, its length added, then MurmurHash3's finaliser. Words longer
    than `_VECTOR_WORD_BYTES` are hashed with BLAKE2b one by one instead. `buffer`
    must hold at least 8 bytes after the last word.
    """
    windows = np.ndarray((len(buffer) - 7,), dtype="<u8", buffer=buffer, strides=(1,))
    hashes = windows[starts] & _LOW_BYTES[np.minimum(lengths, 8)]
    non_ascii = (hashes & _HIGH_BITS) != 0
    longer = np.flatnonzero(lengths > 8)
    for offset in range(8, _VECTOR_WORD_BYTES, 8):
        if not len(longer):
            break
        chunk = windows[starts[longer] + offset]
        chunk &= _LOW_BYTES[np.minimum(lengths[longer] - offset, 8)]
        hashes[longer] = (hashes[longer] * _MIX_1) ^ chunk
        non_ascii[longer] |= (chunk & _HIGH_BITS) != 0
        longer = longer[lengths[longer] > offset + 8]
    for index in longer.tolist():
        start = int(starts[index])
        word = buffer[start : start + int(lengths[index])]
        hashes[index] = int.from_bytes(hashlib.blake2b(word, digest_size=8).digest(), "little")
        non_ascii[index] = not word.isascii()
    hashes += lengths.astype(np.uint64) * _MIX_LENGTH
    return _fmix64(hashes), non_ascii


def _lower_non_ascii_words(
    buffer: bytes, starts: np.ndarray, lengths: np.ndarray, indexes: np.ndarray
) -> tuple[list[int], np.ndarray]:
    """Which of the words at `indexes` `str.lower()` changes, and their new hashes."""
    changed: list[int] = []
    words: list[bytes] = []
    for index, start, length in zip(
        indexes.tolist(), starts[indexes].tolist(), lengths[indexes].tolist(), strict=True
    ):
        word = buffer[start : start + length]
        lowered = word.decode().lower().encode()
        if lowered != word:
            changed.append(index)
            words.append(lowered)
    if not changed:
        return changed, np.empty(0, dtype=np.uint64)
    sizes = np.fromiter(map(len, words), dtype=np.int64, count=len(words))
    offsets = np.cumsum(sizes) - sizes
    return changed, _hash_words(b"".join(words) + _PADDING, offsets, sizes)[0]


def word_hashes(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """A 64-bit hash of each word of every text, flattened, and the word count per text.

    Words are those of `text.lower().encode().split()` (see `_lowered_utf8` for how
    the lower-casing is done cheaply); the batch is one buffer, words are found with
    numpy and hashed by `_hash_words`. Equal words always get equal hashes, in any
    batch and any process.
    """
    parts, sizes, pending = _lowered_utf8(texts)
    # A space before the first word, so word starts and ends alternate in the list of
    # space/non-space changes; 8 after the last, so an 8-byte read at any word byte
    # stays inside the buffer. Rows are joined with a space: no word crosses rows.
    buffer = b" ".join([b"", *parts, _PADDING[1:]]).lower()
    data = np.frombuffer(buffer, dtype=np.uint8)
    # bytes.split() splits on b" \t\n\x0b\x0c\r" (9-13 and 32) and nothing else.
    space = (data - np.uint8(9)) < np.uint8(5)
    space |= data == 32
    changes = np.flatnonzero(space[1:] != space[:-1]) + 1
    starts = changes[0::2]
    lengths = changes[1::2] - starts
    spans = sizes + 1
    row_starts = np.cumsum(spans) - spans + 1
    first_words = np.searchsorted(starts, row_starts)
    counts = np.diff(first_words, append=len(starts)).astype(np.int64)
    hashes, non_ascii = _hash_words(buffer, starts, lengths)
    if pending.any():
        # The non-ASCII words of the texts `_lowered_utf8` left to finish.
        indexes = np.flatnonzero(non_ascii)
        indexes = indexes[pending[np.searchsorted(first_words, indexes, side="right") - 1]]
        if len(indexes):
            changed, new_hashes = _lower_non_ascii_words(buffer, starts, lengths, indexes)
            hashes[changed] = new_hashes
    return hashes, counts


def shingle_hashes(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """32-bit hashes of each text's word 3-shingles, flattened, and the count per text.

    Words are lower-cased, split on whitespace (see `word_hashes`); a text of one
    or two words is one shingle, an empty text has none. A shingle's hash is a
    mix of its three word hashes (never 0), computed for the whole batch at once.
    """
    words, counts = word_hashes(texts)
    total = len(words)
    padded = np.zeros(total + 2, dtype=np.uint64)
    padded[:total] = words
    combined = padded[:total] * _MIX_1
    combined += padded[1 : total + 1] * _MIX_2
    combined += padded[2:] * _MIX_3
    ends = np.cumsum(counts)
    starts = ends - counts
    # Short texts: their one shingle is their one or two words, nothing of the next text.
    for size in (1, 2):
        first = starts[counts == size]
        if len(first):
            combined[first] = padded[first] * _MIX_1
            if size == 2:
                combined[first] += padded[first + 1] * _MIX_2
    # A shingle starts at each word that has two more after it in its own text (or
    # at the first word of a short text).
    keep = np.ones(total, dtype=bool)
    keep[ends[counts >= 2] - 1] = False
    keep[ends[counts >= 3] - 2] = False
    # The high half of a sum of (well-mixed) word hashes times odd constants is already
    # uniform; datasketch's premix in `minhash_signatures` mixes it once more.
    shingles = (combined[keep] >> _SHIFT32).astype(np.uint32)
    # Never 0: the premix keeps 0 at 0, and `a * 0` is the minimum under every
    # permutation, so one such shingle would make all rows that contain it look alike.
    shingles[shingles == 0] = 1
    return shingles, np.maximum(np.minimum(counts, 1), counts - 2)


@lru_cache(maxsize=1)
def multipliers() -> np.ndarray:
    """The `a` of datasketch's affine32 permutations for NUM_PERM and seed 1 (all odd)."""
    a, _ = MinHash(num_perm=NUM_PERM, seed=_MINHASH_SEED, scheme="affine32").permutations
    return a.astype(np.uint32)[:, None]  # type: ignore[no-any-return]


def minhash_signatures(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """MinHash signatures (one row per text, NUM_PERM uint32 columns) for a batch.

    Bit for bit what `datasketch.MinHash(num_perm=NUM_PERM, seed=1, hashfunc=int,
    scheme="affine32", permutations=(multipliers(), 0))` gives when updated with
    `shingle_hashes`: datasketch's premix, then `a * x` modulo 2**32 for each
    permutation, and the minimum over the text's shingles.

    Departing from datasketch's own `+ b` (b drawn at random): on a (permutations x
    shingles) matrix it is a third of the MinHash work (multiply, add, minimum),
    ~19% of near-duplicate detection on ~300-word rows in interleaved runs, and it
    buys nothing measurable here: the premix already spreads the shingle hashes
    uniformly, and an odd `a` keeps each map a bijection. With these maps the
    share of pairs caught at each similarity follows the LSH curve as closely as
    with datasketch's (tests/controlplane/datasets/test_neardup.py; 94.2% of the
    bench's injected near-duplicates caught against 94.1%). The one thing `b`
    guarded against, 0 mapping to 0 under every permutation, `shingle_hashes`
    rules out.

    The shingles of the whole batch are one array, taken in steps of whole texts of
    at most `_CHUNK_SHINGLES` shingles (a longer text alone, in pieces),
    `_PERM_BLOCK` permutations at a time, so the work matrix stays a fixed size;
    each text's minima come from one `np.minimum.reduceat`. Also returns a mask of
    the texts that had any shingle.
    """
    hashes, counts = shingle_hashes(texts)
    has_shingles = counts > 0
    signatures = np.full((len(texts), NUM_PERM), _NO_SHINGLE, dtype=np.uint32)
    total = len(hashes)
    if not total:
        return signatures, has_shingles
    values = _fmix32(hashes)
    a = multipliers()
    # Texts with shingles only: their shingles are contiguous in `values`.
    row_counts = counts[has_shingles]
    row_ends = np.cumsum(row_counts)
    row_starts = row_ends - row_counts
    rows = len(row_counts)
    minima = np.empty((NUM_PERM, rows), dtype=np.uint32)  # one column per text
    work = np.empty((_PERM_BLOCK, min(total, _CHUNK_SHINGLES)), dtype=np.uint32)

    def permuted(low: int, high: int, begin: int, end: int) -> np.ndarray:
        block = work[: high - low, : end - begin]
        np.multiply(a[low:high], values[begin:end], out=block)  # wraps modulo 2**32
        return block

    first = 0
    while first < rows:
        begin = int(row_starts[first])
        last = int(np.searchsorted(row_ends, begin + _CHUNK_SHINGLES, side="right"))
        if last > first:
            end = int(row_ends[last - 1])
            offsets = row_starts[first:last] - begin
            for low in range(0, NUM_PERM, _PERM_BLOCK):
                high = min(low + _PERM_BLOCK, NUM_PERM)
                np.minimum.reduceat(
                    permuted(low, high, begin, end),
                    offsets,
                    axis=1,
                    out=minima[low:high, first:last],
                )
        else:  # one text longer than a step: its pieces, minimum of each
            last = first + 1
            end = int(row_ends[first])
            minima[:, first] = _NO_SHINGLE
            for piece in range(begin, end, _CHUNK_SHINGLES):
                piece_end = min(piece + _CHUNK_SHINGLES, end)
                for low in range(0, NUM_PERM, _PERM_BLOCK):
                    high = min(low + _PERM_BLOCK, NUM_PERM)
                    column = minima[low:high, first]
                    piece_minima = permuted(low, high, piece, piece_end).min(axis=1)
                    np.minimum(column, piece_minima, out=column)
        first = last
    signatures[has_shingles] = minima.T
    return signatures, has_shingles


@lru_cache(maxsize=16)
def lsh_bands(threshold: float) -> tuple[int, int]:
    """(bands, rows per band) datasketch's MinHashLSH picks for `threshold`."""
    index = MinHashLSH(threshold=threshold, num_perm=NUM_PERM)
    return index.b, index.r


def candidate_probability(similarity: float, bands: int, rows_per_band: int) -> float:
    """Chance that two texts of this Jaccard similarity share a band: 1 - (1 - s**r)**b."""
    return float(1 - (1 - similarity**rows_per_band) ** bands)


def _batches(texts: list[str]) -> Iterator[list[str]]:
    batch: list[str] = []
    size = 0
    for text in texts:
        if batch and size + len(text) > BATCH_CHARS:
            yield batch
            batch, size = [], 0
        batch.append(text)
        size += len(text)
    if batch:
        yield batch


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
        """Each band's 64-bit key for every row: one list per band (not one per row, so
        the batch makes a handful of lists rather than a list per row)."""
        width = self.bands * self.rows_per_band
        banded = (
            signatures[:, :width]
            .astype(np.uint64)
            .reshape(len(signatures), self.bands, self.rows_per_band)
        )
        high, low = (
            ((banded * multipliers).sum(axis=2, dtype=np.uint64) + offsets) >> _SHIFT32
            for multipliers, offsets in zip(self._multipliers, self._offsets, strict=True)
        )
        return ((high << _SHIFT32) | low).T.tolist()  # type: ignore[no-any-return]

    def filter(self, texts: list[str]) -> list[bool]:
        """For each text in order: True to keep it, False if it nearly repeats an earlier one.

        Texts kept are remembered; texts without words are always kept. Any number
        of texts may come at once (a few thousand is fastest): they are hashed in
        batches of a bounded size.
        """
        keep: list[bool] = []
        seen = self._seen
        for batch in _batches(texts):
            signatures, has_shingles = minhash_signatures(batch)
            rows_keys = zip(*self._band_keys(signatures), strict=True)
            for row_keys, hashed in zip(rows_keys, has_shingles.tolist(), strict=True):
                if not hashed:
                    keep.append(True)
                elif seen.isdisjoint(row_keys):
                    seen.update(row_keys)
                    keep.append(True)
                else:
                    keep.append(False)
        return keep
