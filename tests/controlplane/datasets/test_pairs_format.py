"""The `pairs` format: query/positive rows (sentence-transformers' anchor/positive pairs)
that embedding models are evaluated on. Validated with line-level errors like the other
formats, cleaned by dataset versions, and refused by fine-tuning, which trains no
embedding model."""

from __future__ import annotations

import io
from typing import Any

import orjson
import pytest

from controlplane.datasets import preprocess, validation
from controlplane.datasets.preprocess import Recipe
from controlplane.datasets.validation import MAX_PAIR_TEXT_CHARS, ValidationReport
from tests.support.jobs import TINY_LLAMA, create_job, register_tiny_llama, upload_file
from tests.support.people import Person


def jsonl(*rows: object) -> bytes:
    return b"".join(orjson.dumps(row) + b"\n" for row in rows)


def validate(data: bytes, filename: str = "pairs.jsonl") -> ValidationReport:
    return validation.validate_stream(io.BytesIO(data), filename=filename)


GOOD = [
    {"query": "how do I reset my password", "positive": "Open settings and press reset."},
    {"query": "where is my parcel", "positive": "It left the depot this morning."},
    {"query": "do you ship abroad", "positive": "We deliver to forty countries."},
]


def test_query_positive_rows_are_told_by_their_keys_and_counted() -> None:
    assert validation.detect_format(orjson.dumps(GOOD[0]), "data.jsonl") == "pairs"
    # Extra keys (an id, a score) are allowed, as in the other formats.
    report = validate(jsonl(*GOOD, {**GOOD[0], "id": 7}) + b"\n")

    assert report.ok(), report.errors
    assert report.format == "pairs"
    assert report.rows == 4
    assert report.blank_lines == 1
    assert report.lengths.max == len(GOOD[0]["query"]) + len(GOOD[0]["positive"])
    assert report.label_counts is None
    assert report.to_dict()["format"] == "pairs"


@pytest.mark.parametrize(
    ("row", "field", "reason"),
    [
        ({"query": "q"}, "positive", "is required"),
        ({"query": "", "positive": "p"}, "query", "must not be empty"),
        ({"query": "   ", "positive": "p"}, "query", "must not be empty"),
        ({"query": "q", "positive": ["p"]}, "positive", "must be a string, got an array"),
        ({"query": 3, "positive": "p"}, "query", "must be a string, got a number"),
        ({"query": None, "positive": "p"}, "query", "must be a string, got null"),
        (
            {"query": "q", "positive": "p" * (MAX_PAIR_TEXT_CHARS + 1)},
            "positive",
            f"must be at most {MAX_PAIR_TEXT_CHARS} characters, got {MAX_PAIR_TEXT_CHARS + 1}",
        ),
    ],
)
def test_a_bad_row_is_reported_by_line_and_field(
    row: dict[str, Any], field: str, reason: str
) -> None:
    report = validate(jsonl(*GOOD, row, GOOD[1]))

    assert not report.ok()
    assert report.rows == 4
    (error,) = report.errors
    assert (error.line, error.field) == (4, field)
    assert reason in error.reason


def test_the_longest_allowed_text_passes_and_other_errors_keep_their_lines() -> None:
    longest = {"query": "q" * MAX_PAIR_TEXT_CHARS, "positive": "p" * MAX_PAIR_TEXT_CHARS}
    report = validate(jsonl(GOOD[0], longest) + b"{not json\n" + jsonl({"messages": []}))

    assert report.rows == 2
    # The format is the first row's: a chat row in a pairs file is a bad pairs row.
    assert [(e.line, e.field) for e in report.errors] == [(3, None), (4, "query")]


def test_an_object_of_unknown_shape_names_pairs_among_the_formats() -> None:
    report = validate(jsonl({"question": "q", "answer": "a"}))

    assert "query+positive (pairs)" in report.errors[0].reason


def test_a_version_cleans_both_texts_drops_duplicates_and_emptied_rows() -> None:
    data = jsonl(
        {"query": "  where   is my\tparcel ", "positive": "It left\u200b the depot."},
        {"query": "where is my parcel", "positive": "It left the depot."},  # same once cleaned
        {"query": "where is my parcel", "positive": "It arrives tomorrow."},  # another pair
        {"query": "\u200b", "positive": "Nothing to ask."},  # empty once cleaned
    )
    output = io.BytesIO()

    report = preprocess.preprocess_stream(
        io.BytesIO(data), output, format="pairs", recipe=Recipe(dedupe_exact=True)
    )

    rows = [orjson.loads(line) for line in output.getvalue().splitlines()]
    assert rows == [
        {"query": "where is my parcel", "positive": "It left the depot."},
        {"query": "where is my parcel", "positive": "It arrives tomorrow."},
    ]
    assert (report.rows_in, report.rows_out) == (4, 2)
    assert report.removed["exact_duplicate"] == 1
    assert report.removed["empty"] == 1
    # What was written validates as pairs again.
    assert validate(output.getvalue()).ok()


@pytest.mark.django_db
def test_the_files_api_validates_a_pairs_file_and_a_dataset_version_keeps_the_format(
    alice: Person, django_capture_on_commit_callbacks: Any
) -> None:
    captured = django_capture_on_commit_callbacks
    file_id = upload_file(alice, jsonl(*GOOD, GOOD[0]), captured)
    file = alice.client.get(f"/v1/files/{file_id}").json()
    assert file["status"] == "processed", file
    assert (file["validation"]["format"], file["validation"]["rows"]) == ("pairs", 4)

    dataset = alice.client.post("/v1/datasets", {"name": "faq"}, format="json").json()["id"]
    with captured(execute=True):
        created = alice.client.post(
            f"/v1/datasets/{dataset}/versions", {"file_ids": [file_id]}, format="json"
        ).json()
    version = alice.client.get(f"/v1/datasets/{dataset}/versions/{created['id']}").json()
    assert (version["status"], version["format"], version["rows"]) == ("ready", "pairs", 3)

    bad = upload_file(alice, jsonl(GOOD[0], {"query": "q", "positive": ""}), captured)
    refused = alice.client.get(f"/v1/files/{bad}").json()
    assert refused["status"] == "error"
    assert "line 2, field 'positive'" in refused["status_details"]


@pytest.mark.django_db
def test_fine_tuning_refuses_a_pairs_file_saying_what_it_trains_on(
    alice: Person, django_capture_on_commit_callbacks: Any
) -> None:
    captured = django_capture_on_commit_callbacks
    register_tiny_llama()
    file_id = upload_file(alice, jsonl(*GOOD), captured)

    response = create_job(alice, captured, model=TINY_LLAMA, training_file=file_id)

    assert response.status_code == 400, response.content
    error = response.json()["error"]
    assert (error["param"], error["code"]) == ("training_file", "invalid_training_file")
    assert "'pairs'" in error["message"]
    assert "chat" in error["message"]  # what it does train on
    assert alice.client.get("/v1/fine_tuning/jobs").json()["data"] == []
