"""Near-duplicate detection: the same MinHash and LSH as datasketch, and what it catches.

No database: `neardup` is a pure library over lists of texts.
"""

from __future__ import annotations

import hashlib
import io
import math
import random

import numpy as np
import orjson
import pytest
from datasketch import MinHash, MinHashLSH

from controlplane.datasets import neardup, preprocess
from controlplane.datasets.preprocess import Recipe

MASK64 = (1 << 64) - 1


def signature_of(shingles: np.ndarray) -> np.ndarray:
    a = neardup.multipliers()[:, 0]
    expected = MinHash(
        num_perm=neardup.NUM_PERM,
        seed=1,
        hashfunc=int,
        scheme="affine32",
        permutations=(a, np.zeros_like(a)),
    )
    expected.update_batch(shingles)
    return expected.hashvalues  # type: ignore[no-any-return]


def long_rows(count: int, *, words: int = 300, seed: int = 1) -> list[list[str]]:
    """Rows of `words` words drawn from a 50,000-word vocabulary: unrelated to each other."""
    generator = random.Random(seed)
    return [[f"w{generator.randrange(50_000)}" for _ in range(words)] for _ in range(count)]


def changed(row: list[str], words: int, generator: random.Random) -> list[str]:
    copy = list(row)
    for position in generator.sample(range(len(row)), words):
        copy[position] = f"new{generator.randrange(10**9)}"
    return copy


def jaccard(a: list[str], b: list[str]) -> float:
    first = {tuple(a[i : i + 3]) for i in range(len(a) - 2)}
    second = {tuple(b[i : i + 3]) for i in range(len(b) - 2)}
    return len(first & second) / len(first | second)


# --- MinHash and LSH agree with datasketch -------------------------------------------------------


def test_the_multipliers_are_datasketchs() -> None:
    a, _ = MinHash(num_perm=neardup.NUM_PERM, seed=1).permutations

    assert neardup.multipliers()[:, 0].tolist() == a.tolist()
    assert all(value % 2 == 1 for value in a.tolist())


def test_signatures_are_datasketchs_minhash_bit_for_bit() -> None:
    texts = ["the quick brown fox jumps over the lazy dog", "Hello world", "", "one"]

    signatures, has_shingles = neardup.minhash_signatures(texts)
    hashes, counts = neardup.shingle_hashes(texts)

    assert has_shingles.tolist() == [True, True, False, True]
    assert counts.tolist() == [7, 1, 0, 1]
    offset = 0
    for text_index, count in enumerate(counts.tolist()):
        expected = signature_of(hashes[offset : offset + count])
        offset += count
        assert np.array_equal(signatures[text_index], expected)


def test_signatures_match_datasketch_whatever_the_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    # Texts of 0 to 400 words, computed in steps of 50 shingles and 48 permutations:
    # some texts share a step, longer ones are split over several.
    generator = random.Random(5)
    texts = [
        " ".join(f"w{generator.randrange(500)}" for _ in range(generator.randrange(400)))
        for _ in range(40)
    ]
    whole, _ = neardup.minhash_signatures(texts)
    monkeypatch.setattr(neardup, "_CHUNK_SHINGLES", 50)
    monkeypatch.setattr(neardup, "_PERM_BLOCK", 48)

    signatures, has_shingles = neardup.minhash_signatures(texts)

    assert np.array_equal(signatures, whole)
    hashes, counts = neardup.shingle_hashes(texts)
    ends = np.cumsum(counts)
    for index, (end, count) in enumerate(zip(ends.tolist(), counts.tolist(), strict=True)):
        assert has_shingles[index] == (count > 0)
        assert np.array_equal(signatures[index], signature_of(hashes[end - count : end]))


def test_similar_texts_get_similar_signatures() -> None:
    a = " ".join(f"word{i}" for i in range(60))
    b = a.replace("word30", "other")
    signatures, _ = neardup.minhash_signatures([a, b, "something else entirely here"])

    assert 0.8 < np.mean(signatures[0] == signatures[1]) < 1.0
    assert np.mean(signatures[0] == signatures[2]) < 0.1


@pytest.mark.parametrize("threshold", [0.5, 0.8, 0.9, 0.95])
def test_lsh_bands_are_the_ones_datasketch_picks(threshold: float) -> None:
    index = MinHashLSH(threshold=threshold, num_perm=neardup.NUM_PERM)

    assert neardup.lsh_bands(threshold) == (index.b, index.r)


# --- words and shingles ---------------------------------------------------------------------------


def fmix64(value: int) -> int:
    value ^= value >> 33
    value = (value * 0xFF51AFD7ED558CCD) & MASK64
    value ^= value >> 33
    value = (value * 0xC4CEB9FE1A85EC53) & MASK64
    return value ^ (value >> 33)


def word_hash(word: bytes) -> int:
    """The word hash, one word at a time, as `word_hashes` documents it."""
    if len(word) > 32:
        value = int.from_bytes(hashlib.blake2b(word, digest_size=8).digest(), "little")
    else:
        value = 0
        for start in range(0, len(word), 8):
            chunk = int.from_bytes(word[start : start + 8], "little")
            value = ((value * 0x9E3779B97F4A7C15) & MASK64) ^ chunk if start else chunk
    return fmix64((value + len(word) * 0x27D4EB2F165667C5) & MASK64)


def test_word_hashes_are_those_of_the_lower_cased_split_words() -> None:
    generator = random.Random(3)
    alphabet = "abcXYZ019 \t\n\r\x0b\x0c\x1c\x85\xa0éßİΣ\u03c3ςǅ日本😀\u2003\u200b,.'ÉÜKΣ"
    texts = [
        "".join(generator.choice(alphabet) for _ in range(generator.randint(0, 200)))
        for _ in range(200)
    ]
    words = ["Hello", "WORLD", "ΣΟΦΙΑ", "Straße", "ÜBER", "İI", "ΟΔΟΣ.", "K", "x" * 40, "y" * 16]
    # A few non-ASCII words (lower-cased one by one) and many (the text at once).
    texts += [" ".join(generator.choices(words, k=generator.randint(0, 40))) for _ in range(50)]
    texts += ["", " ", "x" * 300 + " " + "y" * 40, "word", "12345678 123456789 " * 3]

    hashes, counts = neardup.word_hashes(texts)

    expected = [text.lower().encode().split() for text in texts]
    assert counts.tolist() == [len(split) for split in expected]
    assert hashes.tolist() == [word_hash(word) for split in expected for word in split]
    assert neardup.word_hashes([])[0].tolist() == []


def test_shingles_ignore_case_and_spacing_but_not_order() -> None:
    texts = [
        "The Quick brown Fox",
        "the   quick\tbrown\n\nfox ",
        "quick the brown fox",
        "Ein Über",
        "ein über",
        "solo",
    ]

    hashes, counts = neardup.shingle_hashes(texts)

    assert counts.tolist() == [2, 2, 2, 1, 1, 1]
    shingles = np.split(hashes, np.cumsum(counts)[:-1])
    assert shingles[0].tolist() == shingles[1].tolist()
    assert set(shingles[0].tolist()).isdisjoint(shingles[2].tolist())
    assert shingles[3].tolist() == shingles[4].tolist()


# --- what it catches -----------------------------------------------------------------------------


@pytest.mark.parametrize("threshold", [0.8, 0.9])
def test_long_rows_are_caught_as_often_as_the_lsh_curve_says(threshold: float) -> None:
    """300-word rows with 0 to 20 words changed: the share caught follows 1 - (1 - s^r)^b.

    Each pair goes into a fresh index, so each is caught or not on its own; with the
    hashing deterministic the counts are too, and a hash that was not as random as
    MinHash needs (correlated permutations, colliding shingles) shows up as a count
    far from the curve.
    """
    bands, rows_per_band = neardup.lsh_bands(threshold)
    generator = random.Random(11)
    for words_changed in (0, 1, 2, 3, 5, 8, 12, 20):
        caught = 0
        expected = variance = 0.0
        for row in long_rows(150, seed=words_changed):
            other = changed(row, words_changed, generator)
            probability = neardup.candidate_probability(jaccard(row, other), bands, rows_per_band)
            expected += probability
            variance += probability * (1 - probability)
            index = neardup.NearDuplicates(threshold)
            caught += index.filter([" ".join(row), " ".join(other)]) == [True, False]
        assert abs(caught - expected) <= 4 * math.sqrt(variance) + 2, (words_changed, caught)


def test_a_few_words_changed_out_of_300_are_caught_and_unrelated_rows_are_not() -> None:
    # At the default threshold 0.9 (5 bands of 25): one word changed (similarity
    # ~0.98) is caught 99% of the time and two (~0.96) 90%; rows that only share
    # words, not word sequences, never.
    originals = long_rows(300)
    generator = random.Random(2)
    one = [changed(row, 1, generator) for row in originals]
    two = [changed(row, 2, generator) for row in originals]
    unrelated = long_rows(300, seed=99)
    index = neardup.NearDuplicates(Recipe().near_threshold)

    assert index.filter([" ".join(row) for row in originals]) == [True] * 300
    assert index.filter([" ".join(row) for row in unrelated]) == [True] * 300
    assert index.filter([" ".join(row) for row in one]).count(False) >= 291
    assert index.filter([" ".join(row) for row in two]).count(False) >= 255


def test_near_duplicate_chat_rows_are_removed_in_any_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    # Chat rows of 300 words; the first 20 come back later shouted (not an exact
    # duplicate, the same shingles). Rows wait for a verdict in batches of 16 here:
    # the repeats land in later batches than their originals, several in one batch.
    monkeypatch.setattr(preprocess, "_NEAR_BATCH_ROWS", 16)
    rows = [
        {
            "messages": [
                {"role": "user", "content": " ".join(words[:50])},
                {"role": "assistant", "content": " ".join(words[50:])},
            ]
        }
        for words in long_rows(60)
    ]
    shouted = [
        {
            "messages": [
                {**message, "content": message["content"].upper()} for message in row["messages"]
            ]
        }
        for row in rows[:20]
    ]
    data = b"".join(orjson.dumps(row) + b"\n" for row in rows + shouted)
    output = io.BytesIO()

    report = preprocess.preprocess_stream(
        io.BytesIO(data), output, format="chat", recipe=Recipe(dedupe_near=True)
    )

    assert report.removed == {
        "empty": 0,
        "too_long": 0,
        "exact_duplicate": 0,
        "near_duplicate": 20,
    }
    assert [orjson.loads(line) for line in output.getvalue().splitlines()] == rows


def test_no_shingle_hashes_to_zero(monkeypatch: pytest.MonkeyPatch) -> None:
    # 0 is the minimum under every permutation `a * x`; a shingle hashing to 0 would
    # make all the rows that contain it near-duplicates of each other.
    for name in ("_MIX_1", "_MIX_2", "_MIX_3"):
        monkeypatch.setattr(neardup, name, np.uint64(0))

    hashes, counts = neardup.shingle_hashes(["one two three four", "five"])

    assert counts.tolist() == [2, 1]
    assert hashes.tolist() == [1, 1, 1]
