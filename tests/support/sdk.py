"""The official `openai` SDK, in-process: no network, and inside the test's database transaction."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import httpx
import openai


@contextlib.contextmanager
def in_process_openai(key: str) -> Iterator[openai.OpenAI]:
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
            api_key=key, base_url="http://testserver/v1", http_client=http, max_retries=0
        )
    finally:
        http.close()
        signals.request_started.connect(close_old_connections)
        signals.request_finished.connect(close_old_connections)
