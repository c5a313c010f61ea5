"""The control plane's log lines: one JSON object each (or a human line under
LOG_FORMAT=console, what `make run` uses), secrets removed from every one.

`settings/logging.py` builds Django's LOGGING and structlog's configuration from here:
structlog's own events and every standard-library record (Django, Celery, uvicorn,
`extra={...}` fields included) go through the same formatter, whose last step before
rendering is `jobcontracts.redaction.redact` (the GPU workers run the same one).
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
import structlog

from jobcontracts.redaction import redact

#: structlog's processors before the formatter, for its own events and (with the
#: record's `extra` fields) for the standard library's records.
SHARED_PROCESSORS: list[Any] = [
    structlog.contextvars.merge_contextvars,
    structlog.stdlib.add_log_level,
    structlog.stdlib.add_logger_name,
    structlog.processors.TimeStamper(fmt="iso", utc=True),
]
FORMATS = ("json", "console")


def renderer(log_format: str) -> Any:
    if log_format not in FORMATS:
        raise ValueError(f"LOG_FORMAT={log_format!r}: use 'json' or 'console'")
    if log_format == "json":
        return structlog.processors.JSONRenderer()
    return structlog.dev.ConsoleRenderer(colors=False)


#: `extra` fields of other libraries' records that are noise on a line (uvicorn's colours).
_NOISE = ("color_message",)


def _drop_noise(_logger: Any, _method: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    for key in _NOISE:
        event_dict.pop(key, None)
    return event_dict


def formatter(log_format: str) -> dict[str, Any]:
    """LOGGING's `formatters` entry: structlog's ProcessorFormatter, redacting last."""
    return {
        "()": structlog.stdlib.ProcessorFormatter,
        "processors": [
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            redact,
            renderer(log_format),
        ],
        "foreign_pre_chain": [*SHARED_PROCESSORS, structlog.stdlib.ExtraAdder(), _drop_noise],
    }


def configure_structlog() -> None:
    """structlog's events through the standard library's handlers (LOGGING's formatter),
    and Python's warnings as log lines too (else they are printed raw on stderr)."""
    logging.captureWarnings(True)
    structlog.configure(
        processors=[
            *SHARED_PROCESSORS,
            structlog.processors.StackInfoRenderer(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )


#: A request body looked at for its `model` (job and batch creation): JSON, this small.
MODEL_BODY_MAX_BYTES = 64 * 1024
#: A model id or a route id on a log line, at most this long (they are caller-chosen).
FIELD_MAX = 128


def bounded(value: object) -> str | None:
    """`value` as a log field: a string of printable characters cut to FIELD_MAX."""
    if not isinstance(value, str) or not value:
        return None
    text = value[:FIELD_MAX]
    return text if text.isprintable() else text.encode("unicode_escape").decode()[:FIELD_MAX]


def model_in(body: bytes) -> str | None:
    """The top-level `model` of a JSON object body, bounded; None if there is none."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    return bounded(data.get("model")) if isinstance(data, dict) else None
