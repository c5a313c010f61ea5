"""The GPU and inference workers' log lines: one JSON object each (LOG_FORMAT=console:
human lines, what `make run` uses), with the record's `extra={...}` fields and the
context bound by `bound(...)` (job_id, attempt, request_id), secrets removed
(`jobcontracts.redaction`, the control plane's rules). No Django: configured from
Celery's `setup_logging` signal (gpuworkers.celery), which stops Celery from installing
its own plain-text handlers."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import structlog

from jobcontracts.redaction import redact

FORMATS = ("json", "console")

SHARED_PROCESSORS: list[Any] = [
    structlog.contextvars.merge_contextvars,
    structlog.stdlib.add_log_level,
    structlog.stdlib.add_logger_name,
    structlog.processors.TimeStamper(fmt="iso", utc=True),
]


def log_format(environ: dict[str, str] | None = None) -> str:
    value = (os.environ if environ is None else environ).get("LOG_FORMAT", "json") or "json"
    if value not in FORMATS:
        raise ValueError(f"LOG_FORMAT={value!r}: use 'json' or 'console'")
    return value


def formatter(fmt: str) -> structlog.stdlib.ProcessorFormatter:
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    return structlog.stdlib.ProcessorFormatter(
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            redact,
            renderer,
        ],
        foreign_pre_chain=[*SHARED_PROCESSORS, structlog.stdlib.ExtraAdder()],
    )


def configure(loglevel: int | str = logging.INFO, fmt: str | None = None) -> None:
    """Root logger: one stream handler (stderr) with the structured formatter; Celery's
    loggers propagate to it. structlog's own loggers render through it too."""
    handler = logging.StreamHandler(sys.stderr)  # Celery redirects it to a logger later
    handler.setFormatter(formatter(fmt or log_format()))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(loglevel)
    logging.captureWarnings(True)  # a warning is a line like any other (as Django does)
    for name in ("celery", "celery.task", "celery.redirected"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
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


@contextmanager
def bound(**fields: Any) -> Iterator[None]:
    """Every log line inside carries `fields` (None values left out): a task binds its
    job id and attempt, or its request id, where it starts."""
    with structlog.contextvars.bound_contextvars(
        **{k: v for k, v in fields.items() if v is not None}
    ):
        yield


def bound_job(spec_json: Any) -> Any:
    """`bound(job_id=..., attempt=...)` from a job spec as it arrives (before it is read:
    an invalid spec's line carries them too)."""
    spec = spec_json if isinstance(spec_json, dict) else {}
    job_id, attempt = spec.get("job_id"), spec.get("attempt")
    return bound(
        job_id=job_id if isinstance(job_id, str) else None,
        attempt=attempt if isinstance(attempt, int) else None,
    )
