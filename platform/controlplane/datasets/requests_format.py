"""Validation of files that are not training data: batch request files and eval items.

Same streaming reader and report as `validation` (constant memory, line-level
errors), with the schema these purposes need:

- `batch`: each line is `{"custom_id": str, "method": "POST", "url": "/v1/…",
  "body": {…}}` with `custom_id` unique in the file, as OpenAI's Batch API expects;
- `evals`: each line is a JSON object (its fields are the eval's own business).
"""

from __future__ import annotations

from typing import Any, BinaryIO

import orjson

from .validation import LineError, ValidationReport, iter_lines

BATCH_URLS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")


def validate_requests_stream(
    stream: BinaryIO, *, kind: str, max_errors: int, max_line_bytes: int
) -> ValidationReport:
    if kind not in ("batch", "evals"):
        raise ValueError(f"unknown kind {kind!r}")
    report = ValidationReport(format=kind)
    seen_ids: set[str] = set()

    def error(line: int, field: str | None, reason: str) -> None:
        report.error_count += 1
        if len(report.errors) < max_errors:
            report.errors.append(LineError(line=line, field=field, reason=reason))

    last = 0
    for line_no, line in iter_lines(stream, max_line_bytes=max_line_bytes):
        last = line_no
        if line is None:
            error(line_no, None, f"line too long (over {max_line_bytes} bytes)")
            continue
        report.bytes += len(line) + 1
        if not line.strip():
            report.blank_lines += 1
            continue
        try:
            row: Any = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            error(line_no, None, f"invalid JSON: {exc}")
            continue
        if not isinstance(row, dict):
            error(line_no, None, f"expected a JSON object, got {type(row).__name__}")
            continue
        if kind == "batch":
            problem = _batch_problem(row, seen_ids)
            if problem is not None:
                error(line_no, *problem)
                continue
        report.rows += 1
    if last == 0:
        error(0, None, "file is empty")
    return report


def _batch_problem(row: dict[str, Any], seen: set[str]) -> tuple[str, str] | None:
    custom_id = row.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return "custom_id", "must be a non-empty string"
    if custom_id in seen:
        return "custom_id", f"'{custom_id}' is used by an earlier line; ids must be unique"
    seen.add(custom_id)
    if row.get("method") != "POST":
        return "method", "must be 'POST'"
    if row.get("url") not in BATCH_URLS:
        return "url", f"must be one of {', '.join(BATCH_URLS)}"
    if not isinstance(row.get("body"), dict):
        return "body", "must be a JSON object (the request body)"
    return None
