"""Cleaning a dataset into a new version: what each recipe option removes or rewrites.

No database: preprocessing is a pure library over binary streams.
"""

from __future__ import annotations

import io
from collections import Counter
from typing import Any

import orjson
import pytest

from controlplane.datasets import preprocess, validation
from controlplane.datasets.preprocess import PreprocessError, PreprocessReport, Recipe

NOTHING = Recipe(normalize=False, drop_empty=False, dedupe_exact=False)


def jsonl(*rows: object) -> bytes:
    return b"".join(orjson.dumps(row) + b"\n" for row in rows)


def chat(*turns: tuple[str, str]) -> dict[str, Any]:
    return {"messages": [{"role": role, "content": content} for role, content in turns]}


def run(data: bytes, format: str, recipe: Recipe) -> tuple[bytes, PreprocessReport]:
    output = io.BytesIO()
    report = preprocess.preprocess_stream(io.BytesIO(data), output, format=format, recipe=recipe)
    return output.getvalue(), report


def rows_of(output: bytes) -> list[Any]:
    return [orjson.loads(line) for line in output.splitlines()]


def scrubbed(text: str) -> tuple[str, dict[str, int]]:
    counts: Counter[str] = Counter()
    return preprocess.scrub_pii(text, counts), dict(counts)


# --- recipe -------------------------------------------------------------------------------------


def test_a_recipe_round_trips_through_json() -> None:
    recipe = Recipe(max_chars=4000, dedupe_near=True, near_threshold=0.85, scrub_pii=True)

    assert Recipe.from_dict(orjson.loads(orjson.dumps(recipe.to_dict()))) == recipe


def test_missing_recipe_options_take_their_defaults() -> None:
    assert Recipe.from_dict({}) == Recipe()
    assert Recipe().to_dict() == {
        "normalize": True,
        "drop_empty": True,
        "max_chars": None,
        "dedupe_exact": True,
        "dedupe_near": False,
        "near_threshold": 0.9,
        "scrub_pii": False,
    }


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"dedupe": True}, "unknown recipe option(s): dedupe; known options: normalize, "),
        ({"normalize": "yes"}, "normalize must be true or false"),
        ({"scrub_pii": 1}, "scrub_pii must be true or false"),
        ({"max_chars": 0}, "max_chars must be a positive integer or null"),
        ({"max_chars": 10.5}, "max_chars must be a positive integer or null"),
        ({"max_chars": True}, "max_chars must be a positive integer or null"),
        ({"near_threshold": 1}, "near_threshold must be a number between 0 and 1"),
        ({"near_threshold": 0}, "near_threshold must be a number between 0 and 1"),
        ({"near_threshold": "0.9"}, "near_threshold must be a number between 0 and 1"),
    ],
)
def test_a_bad_recipe_is_refused_with_a_clear_message(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        Recipe.from_dict(data)


def test_a_recipe_must_be_an_object() -> None:
    with pytest.raises(ValueError, match="recipe must be an object"):
        Recipe.from_dict(["normalize"])  # type: ignore[arg-type]


# --- normalisation ------------------------------------------------------------------------------


def test_normalisation_composes_unicode_and_collapses_whitespace() -> None:
    decomposed = "Cafe\u0301   au\tlait \u00a0 ok  "

    assert preprocess.normalize_text(decomposed) == "Caf\u00e9 au lait ok"


def test_normalisation_keeps_compatibility_characters_nfkc_would_rewrite() -> None:
    # Superscript two, the "fi" ligature and full-width A: NFKC would make them "2", "fi", "A".
    text = "x\u00b2 \ufb01ne \uff21"

    assert preprocess.normalize_text(text) == text


def test_normalisation_keeps_indentation_so_code_survives() -> None:
    code = "def f(x):  \n\n\n\n    return  x\u200b + 1\n"

    assert preprocess.normalize_text(code) == "def f(x):\n\n    return x + 1"


def test_normalisation_keeps_the_joiners_scripts_and_emoji_need() -> None:
    family = "\U0001f468\u200d\U0001f469\u200d\U0001f467"

    assert preprocess.normalize_text(f" {family} \u200c ") == f"{family} \u200c"


def test_single_line_normalisation_turns_line_breaks_into_spaces() -> None:
    assert preprocess.normalize_text("a\r\nb  \x00c", single_line=True) == "a b c"


# --- PII -----------------------------------------------------------------------------------------


def test_emails_become_a_typed_placeholder_and_are_counted() -> None:
    text = "Write to jane.doe+ml@example.co.uk or OPS@corp.example.com."

    assert scrubbed(text) == ("Write to [EMAIL] or [EMAIL].", {"email": 2})


def test_a_luhn_valid_card_number_is_replaced_and_an_invalid_one_is_not() -> None:
    text = "Visa 4111 1111 1111 1111, typo 4111-1111-1111-1112, id 1234567812345678"

    assert scrubbed(text) == (
        "Visa [CARD], typo 4111-1111-1111-1112, id 1234567812345678",
        {"card": 1},
    )


def test_a_valid_iban_is_replaced_and_one_failing_mod_97_is_not() -> None:
    text = "Pay DE89 3704 0044 0532 0130 00 NOW, not GB82WEST12345698765433, GB82WEST12345698765432"

    assert scrubbed(text) == (
        "Pay [IBAN] NOW, not GB82WEST12345698765433, [IBAN]",
        {"iban": 2},
    )


@pytest.mark.parametrize(
    "phone",
    [
        "+1 (555) 123-4567",
        "+44 20 7946 0958",
        "+33612345678",
        "(555) 123-4567",
        "555-123-4567",
        "020 7946 0958",
        "06 12 34 56 78",
    ],
)
def test_phone_numbers_in_common_formats_are_replaced(phone: str) -> None:
    assert scrubbed(f"call {phone} now") == ("call [PHONE] now", {"phone": 1})


@pytest.mark.parametrize(
    "text",
    [
        "on 01.02.2023 at 10:30",
        "released 2023-01-02",
        "version 1.2.3",
        "order 12345678 cost $1,299.99",
        "in 2024 we grew 15%",
        "SSN-like 000-12-3456 is not one",
    ],
)
def test_numbers_that_are_not_pii_are_left_alone(text: str) -> None:
    assert scrubbed(text) == (text, {})


def test_ssns_and_ip_addresses_are_replaced() -> None:
    assert scrubbed("SSN 123-45-6789 from 192.168.1.10.") == (
        "SSN [SSN] from [IP_ADDRESS].",
        {"ssn": 1, "ip_address": 1},
    )


# --- the pipeline --------------------------------------------------------------------------------


def test_default_recipe_normalises_and_removes_exact_duplicates() -> None:
    data = jsonl(
        chat(("user", "Hello  there"), ("assistant", "Hi!")),
        chat(("user", "Hello there "), ("assistant", " Hi!")),
        chat(("user", "Bye"), ("assistant", "Bye!")),
    )

    output, report = run(data, "chat", Recipe())

    assert rows_of(output) == [
        chat(("user", "Hello there"), ("assistant", "Hi!")),
        chat(("user", "Bye"), ("assistant", "Bye!")),
    ]
    assert report.to_dict() == {
        "rows_in": 3,
        "rows_out": 2,
        "removed": {"empty": 0, "too_long": 0, "exact_duplicate": 1, "near_duplicate": 0},
        "pii_found": {"email": 0, "phone": 0, "card": 0, "iban": 0, "ssn": 0, "ip_address": 0},
        "rows_normalized": 1,
    }


def test_with_every_step_off_rows_are_copied_unchanged() -> None:
    rows = [chat(("user", " a  "), ("assistant", "")), chat(("user", " a  "), ("assistant", ""))]

    output, report = run(jsonl(*rows), "chat", NOTHING)

    assert rows_of(output) == rows
    assert (report.rows_in, report.rows_out, sum(report.removed.values())) == (2, 2, 0)


def test_other_keys_of_a_row_are_kept() -> None:
    row = {**chat(("user", "q"), ("assistant", "a")), "id": "r1", "tools": [{"type": "function"}]}

    output, _ = run(jsonl(row), "chat", Recipe())

    assert rows_of(output) == [row]


def test_rows_left_empty_by_cleaning_are_dropped() -> None:
    data = jsonl(
        chat(("user", "q"), ("assistant", "   ")),
        chat(("user", "q"), ("assistant", "a")),
        {
            "messages": [
                {"role": "user", "content": "weather?"},
                {"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]},
            ]
        },
    )

    output, report = run(data, "chat", Recipe())

    assert len(rows_of(output)) == 2
    assert report.removed["empty"] == 1


def test_rows_over_max_chars_are_dropped() -> None:
    data = jsonl({"prompt": "p", "completion": "x" * 10}, {"prompt": "p", "completion": "x" * 9})

    output, report = run(data, "prompt_completion", Recipe(max_chars=10))

    assert rows_of(output) == [{"prompt": "p", "completion": "x" * 9}]
    assert report.removed["too_long"] == 1


def test_the_same_text_with_another_label_is_not_a_duplicate() -> None:
    data = jsonl(
        {"text": "ok", "label": "pos"},
        {"text": "ok", "label": "neg"},
        {"text": "ok", "label": "pos"},
    )

    output, report = run(data, "classification", Recipe())

    assert rows_of(output) == [{"text": "ok", "label": "pos"}, {"text": "ok", "label": "neg"}]
    assert report.removed["exact_duplicate"] == 1


def test_near_duplicates_are_removed_keeping_the_first() -> None:
    base = (
        "The quarterly report shows revenue grew by twelve percent while operating costs "
        "stayed flat, driven mostly by strong demand in the northern region and new contracts"
    )
    long_text = " ".join(f"token{i}" for i in range(200))
    rows = [
        {"text": base, "label": "a"},
        {"text": base.upper(), "label": "b"},  # other case: not an exact duplicate
        {"text": "A completely different sentence about the weather in spring.", "label": "a"},
        {"text": long_text, "label": "a"},
        {"text": long_text.replace("token100", "changed"), "label": "a"},  # Jaccard ~0.97
    ]

    output, report = run(jsonl(*rows), "classification", Recipe(dedupe_near=True))

    assert [row["text"][:10] for row in rows_of(output)] == [
        "The quarte",
        "A complete",
        "token0 tok",
    ]
    assert report.removed == {
        "empty": 0,
        "too_long": 0,
        "exact_duplicate": 0,
        "near_duplicate": 2,
    }


def test_near_duplicates_are_found_across_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(preprocess, "_NEAR_BATCH_ROWS", 64)
    words = [f"w{i}" for i in range(9000)]
    rows = [" ".join(words[i * 30 : i * 30 + 30]) for i in range(300)]
    # Rows go to MinHash in batches: the repeats land in a later batch than their originals.
    data = "\n".join(rows + rows[:5]).encode() + b"\n"

    output, report = run(data, "text", Recipe(dedupe_exact=False, dedupe_near=True))

    assert report.rows_out == 300
    assert report.removed["near_duplicate"] == 5
    assert output.decode().splitlines() == rows


def test_pii_is_scrubbed_in_every_message_and_counted_for_rows_written() -> None:
    data = jsonl(
        chat(("user", "I am ann@example.com"), ("assistant", "Noted, call +44 20 7946 0958")),
        chat(("user", "I am bob@example.com"), ("assistant", "Noted, call +44 20 7946 0958")),
    )

    output, report = run(data, "chat", Recipe(scrub_pii=True))

    # Once scrubbed the rows are equal: the second goes, and so do its counts.
    assert rows_of(output) == [chat(("user", "I am [EMAIL]"), ("assistant", "Noted, call [PHONE]"))]
    assert report.removed["exact_duplicate"] == 1
    assert report.pii_found["email"] == 1
    assert report.pii_found["phone"] == 1


def test_preference_rows_clean_prompt_chosen_and_rejected() -> None:
    row = {
        "prompt": [{"role": "user", "content": "mail  me: x@y.org"}],
        "chosen": " Sure ",
        "rejected": "No",
    }

    output, _ = run(jsonl(row), "preference", Recipe(scrub_pii=True))

    assert rows_of(output) == [
        {
            "prompt": [{"role": "user", "content": "mail me: [EMAIL]"}],
            "chosen": "Sure",
            "rejected": "No",
        }
    ]


def test_csv_keeps_its_header_and_cleans_every_cell() -> None:
    data = b'name,note\nAnn,"call  555-123-4567, ok"\nAnn,"call 555-123-4567,  ok"\n,\n'

    output, report = run(data, "csv", Recipe(scrub_pii=True))

    assert output == b'name,note\nAnn,"call [PHONE], ok"\n'
    assert report.removed == {
        "empty": 1,
        "too_long": 0,
        "exact_duplicate": 1,
        "near_duplicate": 0,
    }


def test_text_lines_are_cleaned_and_blank_lines_dropped() -> None:
    data = "  Ünïcode   line \n\n  Ünïcode line\nsecond\n".encode()

    output, report = run(data, "text", Recipe())

    assert output.decode() == "Ünïcode line\nsecond\n"
    assert (report.rows_in, report.rows_out, report.removed["exact_duplicate"]) == (3, 2, 1)


def test_the_output_is_a_valid_dataset_of_the_same_format() -> None:
    rows = [
        chat(("user", f"question {i} from a{i}@example.com"), ("assistant", "ok"))
        for i in range(50)
    ]
    recipe = Recipe(dedupe_near=True, scrub_pii=True)

    output, _ = run(jsonl(*rows), "chat", recipe)
    report = validation.validate_stream(io.BytesIO(output), filename="clean.jsonl")

    assert report.ok(), report.errors
    assert report.format == "chat"


def test_input_that_does_not_parse_is_refused_with_its_line_number() -> None:
    with pytest.raises(PreprocessError, match=r"^line 2: invalid JSON"):
        run(jsonl(chat(("user", "q"), ("assistant", "a"))) + b"{oops\n", "chat", Recipe())


def test_a_ragged_csv_row_is_refused() -> None:
    with pytest.raises(PreprocessError, match=r"^line 3: row has 1 fields but the header has 2"):
        run(b"a,b\n1,2\n3\n", "csv", Recipe())


def test_an_unknown_format_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown format 'parquet'"):
        run(b"", "parquet", Recipe())
