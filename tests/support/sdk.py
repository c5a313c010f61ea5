"""The official `openai` SDK pointed at the platform, in-process (no network)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import openai


@contextmanager
def in_process_sdk(api_key: str) -> Iterator[openai.OpenAI]:
    """WSGI transport into Django: same database transaction as the test."""
    from django.core import signals
    from django.core.wsgi import get_wsgi_application
    from django.db import close_old_connections

    # As Django's test client does: keep the test's connection (and transaction) open.
    signals.request_started.disconnect(close_old_connections)
    signals.request_finished.disconnect(close_old_connections)
    http = httpx.Client(
        transport=httpx.WSGITransport(app=get_wsgi_application()), base_url="http://testserver"
    )
    try:
        yield openai.OpenAI(
            api_key=api_key, base_url="http://testserver/v1", http_client=http, max_retries=0
        )
    finally:
        signals.request_started.connect(close_old_connections)
        signals.request_finished.connect(close_old_connections)
