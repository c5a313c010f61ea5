"""Structured logs (structlog), one JSON object a line; Django's, Celery's and uvicorn's
own loggers go through it too, and every line has its secrets removed
(`controlplane.core.logs`). LOG_FORMAT=console renders human lines (`make run`)."""

from controlplane.core.logs import configure_structlog, formatter

from .env import env

LOG_LEVEL = env.str("LOG_LEVEL", default="INFO")
LOG_FORMAT = env.str("LOG_FORMAT", default="json")  # json | console

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"structured": formatter(LOG_FORMAT)},
    "handlers": {
        "console": {"class": "logging.StreamHandler", "formatter": "structured"},
    },
    "root": {"handlers": ["console"], "level": LOG_LEVEL},
    "loggers": {
        # Our middleware logs each request once, with its request id.
        "django.request": {"level": "ERROR", "propagate": True},
        "django.server": {"level": "WARNING", "propagate": True},
        "uvicorn.access": {"level": "WARNING", "propagate": True},
        # uvicorn's own handlers print plain text: its lines go through ours instead (a
        # supervisor of several workers logs a few plain lines before Django is loaded).
        "uvicorn": {"handlers": [], "level": "INFO", "propagate": True},
    },
}

configure_structlog()
