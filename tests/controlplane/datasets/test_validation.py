"""Streaming validation of training files: what a user uploading a bad file is told.

No database: validation is a pure library over binary streams.
"""

from __future__ import annotations

import io
import json
import random
import tracemalloc
from collections.abc import Iterator

import orjson
import pytest

from controlplane.datasets import validation
from controlplane.datasets.validation import LengthStats, LineError, ValidationReport

MiB = 1024 * 1024


def jsonl(*rows: object) -> bytes:
    return b"".join(orjson.dumps(row) + b"\n" for row in rows)


def chat(*turns: tuple[str, str | None]) -> dict[str, object]:
    return {"messages": [{"role": role, "content": content} for role, content in turns]}


GOOD_CHAT = chat(("system", "Be brief."), ("user", "2+2?"), ("assistant", "4"))


def validate(data: bytes, filename: str = "data.jsonl", **options: object) -> ValidationReport:
    return validation.validate_stream(io.BytesIO(data), filename=filename, **options)  # type: ignore[arg-type]


def only_error(report: ValidationReport) -> LineError:
    assert report.error_count == 1, report.errors
    return report.errors[0]


class GeneratedStream(io.RawIOBase):
    """A read-only stream fed by a generator of chunks: nothing ever holds the whole file."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._left = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        while not self._left:
            try:
                self._left = next(self._chunks)
            except StopIteration:
                return 0
        size = min(len(buffer), len(self._left))
        buffer[:size] = self._left[:size]
        self._left = self._left[size:]
        return size


# --- good files ------------------------------------------------------------------------------


def test_a_valid_chat_file_is_ok_with_rows_roles_and_lengths() -> None:
    report = validate(jsonl(GOOD_CHAT, chat(("user", "hi"), ("assistant", "hello"))))

    assert report.ok()
    assert report.format == "chat"
    assert report.rows == 2
    assert report.roles == {"system": 1, "user": 2, "assistant": 2, "tool": 0}
    lengths = report.to_dict()["lengths"]
    # "Be brief." + "2+2?" + "4" = 14 characters; "hi" + "hello" = 7.
    assert lengths == {
        "count": 2,
        "min": 7,
        "max": 14,
        "mean": 10.5,
        "p50": 7,
        "p90": 14,
        "p99": 14,
    }


def test_the_report_is_json_serialisable_for_the_api() -> None:
    report = validate(jsonl(GOOD_CHAT, [1]), max_errors=5)

    payload = json.loads(json.dumps(report.to_dict()))

    assert payload["ok"] is False
    assert payload["errors"] == [
        {
            "line": 2,
            "field": None,
            "reason": "expected a JSON object, got an array "
            "(JSON Lines holds one object per line, not one array of them)",
        }
    ]
    assert payload["bytes"] == len(jsonl(GOOD_CHAT, [1]))


def test_an_assistant_tool_call_may_have_null_content() -> None:
    row = {
        "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"id": "c1", "type": "function"}],
            },
            {"role": "tool", "content": '{"temp": 21}', "tool_call_id": "c1"},
            {"role": "assistant", "content": "21 degrees."},
        ]
    }

    report = validate(jsonl(row))

    assert report.ok(), report.errors
    assert report.roles == {"system": 0, "user": 1, "assistant": 2, "tool": 1}


def test_prompt_completion_rows_are_counted() -> None:
    report = validate(jsonl({"prompt": "2+2?", "completion": "4"}) * 3)

    assert report.ok()
    assert (report.format, report.rows, report.lengths.max) == ("prompt_completion", 3, 5)


def test_preference_rows_take_a_string_or_a_conversation_as_prompt() -> None:
    conversation = [{"role": "user", "content": "Hi"}]
    report = validate(
        jsonl(
            {"prompt": "Say hi", "chosen": "Hi!", "rejected": "No."},
            {"prompt": conversation, "chosen": "Hello!", "rejected": "Go away."},
            {"messages": conversation, "chosen": "Hey!", "rejected": "..."},
        )
    )

    assert report.ok(), report.errors
    assert (report.format, report.rows) == ("preference", 3)


def test_classification_counts_labels_strings_and_integers_alike() -> None:
    report = validate(
        jsonl(
            {"text": "great", "label": "pos"},
            {"text": "awful", "label": "neg"},
            {"text": "fine", "label": "pos"},
            {"text": "meh", "label": 3},
        )
    )

    assert report.ok()
    assert report.label_counts == {"pos": 2, "neg": 1, "3": 1}


def test_distinct_labels_beyond_the_cap_are_counted_as_other() -> None:
    rows = [{"text": "t", "label": f"l{i}"} for i in range(validation.MAX_LABELS + 5)]

    report = validate(jsonl(*rows, {"text": "t", "label": "l0"}))

    assert report.label_counts is not None
    assert len(report.label_counts) == validation.MAX_LABELS + 1
    assert report.label_counts[validation.OTHER_LABEL] == 5
    assert report.label_counts["l0"] == 2


def test_a_csv_with_a_header_is_ok_and_quoted_commas_are_one_field() -> None:
    report = validate(b'question,answer\n"2+2, please?",4\nsky?,blue\n', filename="qa.csv")

    assert report.ok(), report.errors
    assert (report.format, report.rows, report.columns) == ("csv", 2, ["question", "answer"])
    assert report.lengths.max == len("2+2, please?4")


def test_plain_text_counts_each_non_empty_line_as_a_row() -> None:
    report = validate(b"Once upon a time\n\n   \nthe end\n", filename="story.txt")

    assert report.ok()
    assert (report.format, report.rows, report.blank_lines) == ("text", 2, 2)


def test_blank_lines_in_json_lines_are_skipped_and_counted() -> None:
    report = validate(b"\n" + jsonl(GOOD_CHAT) + b"  \n\n" + jsonl(GOOD_CHAT))

    assert report.ok()
    assert (report.rows, report.blank_lines) == (2, 3)


def test_windows_line_endings_and_a_byte_order_mark_are_accepted() -> None:
    data = b"\xef\xbb\xbf" + jsonl(GOOD_CHAT, GOOD_CHAT).replace(b"\n", b"\r\n")
    assert validate(data).ok()
    assert validate(b"\xef\xbb\xbfa,b\r\n1,2\r\n", filename="x.csv").columns == ["a", "b"]


# --- bad files ---------------------------------------------------------------------------------


def test_an_empty_file_is_an_error_at_line_0() -> None:
    report = validate(b"")

    assert not report.ok()
    assert (report.rows, report.bytes) == (0, 0)
    assert only_error(report) == LineError(0, None, "file is empty")


def test_a_file_of_blank_lines_has_no_rows() -> None:
    report = validate(b"\n \n\t\n", filename="x.txt")

    assert only_error(report) == LineError(0, None, "file has no rows, only blank lines")


def test_truncated_last_line_is_reported_with_its_line_number() -> None:
    data = jsonl(GOOD_CHAT, GOOD_CHAT) + b'{"messages": [{"role": "user", "cont'

    report = validate(data)

    error = only_error(report)
    assert error.line == 3
    assert error.reason.startswith("truncated last line")
    assert "unexpected end of data" in error.reason
    assert report.rows == 2


def test_a_broken_line_in_the_middle_is_invalid_json_not_truncation() -> None:
    report = validate(jsonl(GOOD_CHAT) + b'{"messages": [\n' + jsonl(GOOD_CHAT))

    error = only_error(report)
    assert error.line == 2
    assert error.reason.startswith("invalid JSON at column 15")


def test_invalid_utf8_is_reported_as_such_with_its_column() -> None:
    line = b'{"messages": [{"role": "user", "content": "caf\xe9"}]}'

    error = only_error(validate(jsonl(GOOD_CHAT) + line + b"\n"))

    assert error.line == 2
    assert error.reason == f"not valid UTF-8: byte 0xe9 at column {line.index(0xE9) + 1}"


def test_invalid_utf8_in_a_text_file_is_an_error() -> None:
    error = only_error(validate(b"fine\nna\xefve\n", filename="corpus.txt"))

    assert (error.line, error.reason) == (2, "not valid UTF-8: byte 0xef at column 3")


def test_a_100_mb_line_is_refused_without_loading_it() -> None:
    chunk = b"x" * MiB

    def content() -> Iterator[bytes]:
        yield jsonl(GOOD_CHAT)
        yield b'{"messages": "'
        for _ in range(100):
            yield chunk
        yield b'"}\n'
        yield jsonl(GOOD_CHAT)

    tracemalloc.start()
    try:
        report = validation.validate_stream(
            GeneratedStream(content()),  # type: ignore[arg-type]
            filename="huge.jsonl",
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    error = only_error(report)
    assert error.line == 2
    assert error.reason.startswith("line too long: more than 8388608 bytes")
    assert report.rows == 2
    assert report.bytes > 100 * MiB
    # The default 8 MiB line limit plus a chunk or two, never the 100 MiB line.
    assert peak < 24 * MiB


def test_an_over_long_last_line_without_a_newline_is_refused_too() -> None:
    report = validate(jsonl(GOOD_CHAT) + b"y" * 300, max_line_bytes=200)

    assert only_error(report).line == 2
    assert report.rows == 1


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        (b"[1, 2]", "expected a JSON object, got an array"),
        (b'"hello"', "expected a JSON object, got a string"),
        (b"42", "expected a JSON object, got a number"),
        (b"null", "expected a JSON object, got null"),
    ],
)
def test_a_json_value_that_is_not_an_object_is_refused(line: bytes, reason: str) -> None:
    error = only_error(validate(jsonl(GOOD_CHAT) + line + b"\n"))

    assert error.line == 2
    assert error.reason.startswith(reason)


@pytest.mark.parametrize(
    ("messages", "field", "reason"),
    [
        (None, "messages", "must be a list of messages, got null"),
        ("hi", "messages", "must be a list of messages, got a string"),
        ([], "messages", "must not be empty"),
        (["hi"], "messages[0]", "must be an object, got a string"),
        (
            [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}],
            "messages[1].role",
            "must be one of system, user, assistant, tool; got 'bot'",
        ),
        (
            [{"content": "a"}],
            "messages[0].role",
            "must be one of system, user, assistant, tool; it is missing",
        ),
        ([{"role": "user"}], "messages[0].content", "is required"),
        ([{"role": "user", "content": 7}], "messages[0].content", "must be a string, got a number"),
        (
            [{"role": "user", "content": "a"}, {"role": "assistant", "content": None}],
            "messages[1].content",
            "may be null only on an assistant message with tool_calls",
        ),
        (
            [{"role": "user", "content": None, "tool_calls": [{"id": "x"}]}],
            "messages[0].content",
            "may be null only on an assistant message with tool_calls",
        ),
        (
            [{"role": "system", "content": "a"}, {"role": "user", "content": "b"}],
            "messages",
            "needs at least one assistant message to learn from",
        ),
    ],
)
def test_a_bad_chat_row_names_the_field_and_the_reason(
    messages: object, field: str, reason: str
) -> None:
    report = validate(jsonl(GOOD_CHAT, {"messages": messages}), format="chat")

    assert only_error(report) == LineError(2, field, reason)
    assert report.rows == 1
    # Roles of a refused row are not counted.
    assert report.roles == {"system": 1, "user": 1, "assistant": 1, "tool": 0}


def test_a_chat_row_without_messages_says_they_are_required() -> None:
    report = validate(jsonl({"prompt": "x", "completion": "y"}), format="chat")

    assert only_error(report) == LineError(1, "messages", "is required")


@pytest.mark.parametrize(
    ("row", "field", "reason"),
    [
        ({"prompt": "p"}, "completion", "is required"),
        ({"prompt": "", "completion": "c"}, "prompt", "must not be empty"),
        ({"prompt": "p", "completion": "   "}, "completion", "must not be empty"),
        ({"prompt": ["p"], "completion": "c"}, "prompt", "must be a string, got an array"),
    ],
)
def test_a_bad_prompt_completion_row_is_refused(row: object, field: str, reason: str) -> None:
    report = validate(jsonl(row), format="prompt_completion")

    assert only_error(report) == LineError(1, field, reason)


@pytest.mark.parametrize(
    ("row", "field", "reason"),
    [
        ({"prompt": "p", "chosen": "a", "rejected": "a"}, "rejected", "must differ from chosen"),
        ({"prompt": "p", "chosen": "", "rejected": "b"}, "chosen", "must not be empty"),
        ({"prompt": "p", "chosen": "a"}, "rejected", "is required"),
        ({"chosen": "a", "rejected": "b"}, "prompt", "is required"),
        (
            {"prompt": 3, "chosen": "a", "rejected": "b"},
            "prompt",
            "must be a string or a list of messages, got a number",
        ),
        (
            {"prompt": [{"role": "human", "content": "x"}], "chosen": "a", "rejected": "b"},
            "prompt[0].role",
            "must be one of system, user, assistant, tool; got 'human'",
        ),
    ],
)
def test_a_bad_preference_row_is_refused(row: object, field: str, reason: str) -> None:
    report = validate(jsonl(row), format="preference")

    assert only_error(report) == LineError(1, field, reason)


@pytest.mark.parametrize(
    ("row", "field", "reason"),
    [
        ({"text": "t", "label": True}, "label", "must be a string or an integer, got a boolean"),
        ({"text": "t", "label": 1.5}, "label", "must be a string or an integer, got a number"),
        ({"text": "t", "label": ""}, "label", "must not be empty"),
        ({"text": "t"}, "label", "is required"),
        ({"text": None, "label": "a"}, "text", "must be a string, got null"),
    ],
)
def test_a_bad_classification_row_is_refused(row: object, field: str, reason: str) -> None:
    report = validate(jsonl(row), format="classification")

    assert only_error(report) == LineError(1, field, reason)
    assert report.label_counts == {}


def test_rows_of_another_format_in_the_same_file_are_errors() -> None:
    report = validate(jsonl(GOOD_CHAT, {"prompt": "p", "completion": "c"}))

    assert report.format == "chat"
    assert only_error(report) == LineError(2, "messages", "is required")


def test_ragged_csv_rows_are_refused_line_by_line() -> None:
    report = validate(b"a,b,c\n1,2,3\n1,2\n1,2,3,4\n4,5,6\n", filename="table.csv")

    assert report.rows == 2
    assert report.errors == [
        LineError(3, None, "row has 2 fields but the header has 3"),
        LineError(4, None, "row has 4 fields but the header has 3"),
    ]


def test_a_csv_field_spanning_lines_is_refused_with_a_clear_error() -> None:
    report = validate(b'q,a\n"first line\nsecond line",x\nok,1\n', filename="t.csv")

    assert only_error(report) == LineError(
        2,
        None,
        "malformed CSV: unterminated quoted field: close the quote (a field may not span lines)",
    )
    # Lines 3 and 4 are read on their own: one stray quote does not swallow the file.
    assert report.rows == 2


def test_a_csv_with_only_a_header_has_no_rows() -> None:
    report = validate(b"a,b\n", filename="t.csv")

    assert only_error(report) == LineError(0, None, "file has a header but no rows")


def test_a_csv_header_with_a_duplicate_column_is_refused() -> None:
    report = validate(b"a,b,a\n1,2,3\n", filename="t.csv")

    assert only_error(report) == LineError(1, "a", "duplicate column name in the header")


def test_the_first_errors_are_kept_and_all_are_counted() -> None:
    data = jsonl(GOOD_CHAT) + b"not json\n" * 250

    report = validate(data, max_errors=10)

    assert report.error_count == 250
    assert [error.line for error in report.errors] == list(range(2, 12))
    assert report.to_dict()["errors_truncated"] is True
    assert report.rows == 1


def test_an_over_long_line_in_a_text_file_does_not_stop_the_rest() -> None:
    report = validate(b"short\n" + b"z" * 5000 + b"\nshort again\n", "t.txt", max_line_bytes=1000)

    assert only_error(report) == LineError(
        2, None, "line too long: more than 1000 bytes (the rest of it was skipped)"
    )
    assert report.rows == 2


# --- formats -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("first_line", "filename", "expected"),
    [
        (b'{"messages": []}', "a.jsonl", "chat"),
        (b'{"prompt": "p", "completion": "c"}', "a.JSONL", "prompt_completion"),
        (b'{"prompt": "p", "chosen": "a", "rejected": "b"}', "a.json", "preference"),
        (b'{"text": "t", "label": 1}', "a.ndjson", "classification"),
        (b'{"messages": []}', "a.data", "chat"),
        (b"anything", "a.csv", "csv"),
        (b'{"messages": []}', "a.txt", "text"),
        (b'{"foo": 1}', "a.jsonl", None),
        (b"[1]", "a.jsonl", None),
        (b"not json", "a.jsonl", None),
        (b"plain words", "README", None),
    ],
)
def test_detect_format(first_line: bytes, filename: str, expected: str | None) -> None:
    assert validation.detect_format(first_line, filename) == expected


def test_the_first_object_whose_keys_tell_the_format_sets_it() -> None:
    report = validate(b"oops\n" + jsonl({"foo": 1}, GOOD_CHAT, GOOD_CHAT))

    assert report.format == "chat"
    assert report.rows == 2
    assert [error.line for error in report.errors] == [1, 2]
    assert report.errors[1].reason.startswith("cannot tell the dataset format")


def test_a_file_with_an_unknown_extension_is_sniffed_for_json_lines() -> None:
    assert validate(b"\n" + jsonl(GOOD_CHAT), filename="upload.bin").format == "chat"

    report = validate(b"some prose\n", filename="upload.bin")
    assert report.format is None
    assert "cannot tell the format of 'upload.bin'" in only_error(report).reason


def test_an_explicit_format_wins_over_the_extension() -> None:
    report = validate(jsonl(GOOD_CHAT), filename="chat.txt", format="chat")

    assert report.ok()
    assert report.format == "chat"


def test_an_unknown_format_name_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="unknown format 'yaml'"):
        validate(b"x", format="yaml")


# --- reading lines and summarising lengths --------------------------------------------------------


def reference_lines(data: bytes, limit: int) -> list[tuple[int, bytes | None]]:
    parts = data.split(b"\n")
    if parts[-1] == b"":
        parts.pop()
    lines: list[tuple[int, bytes | None]] = []
    for number, part in enumerate(parts, start=1):
        if len(part) > limit:
            lines.append((number, None))
            continue
        if number == 1:
            part = part.removeprefix(b"\xef\xbb\xbf")
        lines.append((number, part.removesuffix(b"\r")))
    return lines


def test_lines_come_out_the_same_whatever_the_chunk_boundaries() -> None:
    generator = random.Random(7)
    for _ in range(400):
        data = bytes(generator.choice(b"ab\n\r") for _ in range(generator.randrange(0, 40)))
        if generator.random() < 0.2:
            data = b"\xef\xbb\xbf" + data
        limit = generator.randrange(1, 8)
        chunk_size = generator.randrange(1, 10)

        lines = list(
            validation.iter_lines(io.BytesIO(data), max_line_bytes=limit, chunk_size=chunk_size)
        )

        assert lines == reference_lines(data, limit), (data, limit, chunk_size)


def test_length_percentiles_are_exact_until_the_sample_is_full() -> None:
    stats = LengthStats(sample_size=1000)
    stats.add_many(list(range(1, 101)))

    assert stats.to_dict() == {
        "count": 100,
        "min": 1,
        "max": 100,
        "mean": 50.5,
        "p50": 50,
        "p90": 90,
        "p99": 99,
    }


def test_length_percentiles_come_from_a_bounded_sample_beyond_it() -> None:
    stats = LengthStats(sample_size=2000)
    values = list(range(100_000))
    random.Random(3).shuffle(values)
    for start in range(0, len(values), 777):
        stats.add_many(values[start : start + 777])

    summary = stats.to_dict()

    assert (summary["count"], summary["min"], summary["max"]) == (100_000, 0, 99_999)
    assert stats.sampled == 2000
    assert abs(summary["p50"] - 50_000) < 5_000
    assert abs(summary["p90"] - 90_000) < 3_000
