"""An ASGI wrapper that refuses oversized request bodies before Django reads them.

Django's ASGI handler reads the whole body (spooling to disk) before any
middleware runs, so a Django-level check would still accept a 10 GB upload
first. This wrapper answers 413 on the declared `content-length`, and for
chunked bodies stops counting and answers 413 as soon as the limit is passed.

Being the outermost layer, it also counts and times every HTTP request for the metrics
(`core.metrics.HttpTimer`): Django's, the serving router's (which never reach Django's
middleware) and its own 413s alike.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from django.conf import settings

from . import metrics
from .errors import error_body
from .requestid import HEADER, request_id_from

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class BodyTooLarge(Exception):
    """Raised by the limited `receive` once a body passes its limit. An app inside
    `BodySizeLimit` that catches every Exception (to answer in OpenAI's shape) must let
    this one through: the wrapper answers it with a 413 (issue 19: it was a 500)."""


class BodySizeLimit:
    def __init__(
        self,
        app: ASGIApp,
        *,
        default_limit: int,
        limits_by_prefix: dict[str, int] | None = None,
    ) -> None:
        self.app = app
        self.measure = getattr(settings, "METRICS_ENABLED", True)
        self.default_limit = default_limit
        # Longest prefix first, so /v1/uploads/x/parts beats /v1/.
        self.limits = sorted((limits_by_prefix or {}).items(), key=lambda kv: -len(kv[0]))

    def limit_for(self, path: str) -> int:
        for prefix, limit in self.limits:
            if path.startswith(prefix):
                return limit
        return self.default_limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            # Django has no lifespan; the metrics need its shutdown (`core.metrics`).
            await metrics.lifespan(receive, send)
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        timer = metrics.HttpTimer(scope) if self.measure else metrics.NoTimer()
        try:
            await self._call(scope, receive, send, timer)
        finally:
            timer.done()

    async def _call(
        self, scope: Scope, receive: Receive, send: Send, timer: metrics.HttpTimer | metrics.NoTimer
    ) -> None:
        limit = self.limit_for(scope.get("path", ""))
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                too_big = int(declared) > limit
            except ValueError:
                too_big = False
            if too_big:
                timer.status = 413
                await self._reject(headers, limit, send)
                return

        received = 0
        response_started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge
            elif message["type"] == "http.disconnect" and not response_started:
                timer.status = 499  # the caller left before an answer (nginx's number)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal response_started
            if message["type"] == "http.response.start":
                response_started = True
                timer.status = message["status"]
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge:
            if not response_started:
                timer.status = 413
                await self._reject(headers, limit, send)

    @staticmethod
    async def _reject(headers: dict[bytes, bytes], limit: int, send: Send) -> None:
        body = json.dumps(
            error_body(
                f"Request body is larger than the {limit} bytes this endpoint accepts. "
                "Send less data, or use the uploads API for large files.",
                status_code=413,
                code="request_too_large",
            )
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                    (HEADER.encode(), request_id_from(headers.get(HEADER.encode())).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
