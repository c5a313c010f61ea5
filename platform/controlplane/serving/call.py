"""One inference request on the event loop, from its first byte to its settlement.

In order: the Host (as Django checks it), the body, the API key and its
`inference` scope (accounts' and tenancy's own checks), the input (the endpoint's
serializer), the model (this process's cache, the database in a thread on a miss),
admission (billing standing, plan caps, rate limits, the budget hold:
`admission.aadmit`), the reply subscription (the process's `ReplyHub`), the send
(one Redis round trip, `gateway.asend`), the response or the server-sent events,
and, after the response, the settlement at the usage the worker reports
(`admission.asettle_reported`). A client that disconnects cancels its generation,
streaming or not. Every error is answered in OpenAI's shape (`core.errors.error_parts`).

Database look-ups happen only on a cache miss, through `sync_to_async` in its default,
thread-sensitive mode: outside Django's request handling that is one thread, and one
database connection, per process, for every look-up of the serving path (the key, the
model, standing, plan, limits, prices, budgets), as Django expects of its ORM; under
`async_to_sync` (tests, sync callers) it is the caller's thread, in its transaction.
"""

from __future__ import annotations

import asyncio
import io
import logging
import time
from typing import Any

import orjson
import redis
import structlog
from asgiref.sync import sync_to_async
from django.conf import settings
from django.core.exceptions import DisallowedHost
from django.core.handlers.asgi import ASGIRequest
from rest_framework import exceptions

from controlplane.accounts.authentication import (
    AUTHENTICATE_HEADER,
    Principal,
    akey_authenticate,
)
from controlplane.core.asgi_limits import BodyTooLarge, Receive, Scope, Send
from controlplane.core.errors import ApiError, error_parts
from controlplane.core.requestid import HEADER, request_id_from
from controlplane.core.serializers import validated_reusing
from controlplane.inference import request_errors
from controlplane.tenancy.apis_base import scope_require
from controlplane.tenancy.models import Organization
from jobcontracts.inference import InferenceRequest, ModelRef, Reply

from . import admission, gateway
from .endpoints import STREAM_HEADERS, Endpoint, error_event, event, transport_unavailable
from .replies import ReplyTimeout, Subscription, acancel, hub

log = structlog.get_logger("controlplane.request")
#: Where Django logs a refused Host (`response_for_exception`): the same filters apply.
_host_log = logging.getLogger("django.security.DisallowedHost")

#: What Django's SecurityMiddleware would have added (settings permitting).
_SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),
    (b"cross-origin-opener-policy", b"same-origin"),
]


class Call:
    """One inference request on the event loop."""

    def __init__(self, api: type[Endpoint], scope: Scope, receive: Receive, send: Send):
        self.api = api
        self.scope = scope
        self.receive = receive
        self._send = send
        self.headers: dict[bytes, bytes] = dict(scope["headers"])
        self.request_id = request_id_from(self.headers.get(b"x-request-id"))
        self.started = time.perf_counter()
        self.status = 0
        self.extra_headers: dict[str, str] = {}
        #: Sent or not, its final reply seen or not, and the usage it gave: what is settled.
        self.outcome = admission.Outcome()
        self.disconnected: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def run(self) -> None:
        structlog.contextvars.bind_contextvars(request_id=self.request_id)
        try:
            await self._serve()
        except BodyTooLarge:
            self.status = 413
            raise  # BodySizeLimit answers it (413, OpenAI's shape), as on every route
        except Exception as exc:  # every error in OpenAI's shape, as every DRF view answers
            if self.status:  # already streaming: nothing more can be said over HTTP
                log.exception("inference.stream_failed")
            else:
                if isinstance(exc, exceptions.NotAuthenticated | exceptions.AuthenticationFailed):
                    exc.auth_header = AUTHENTICATE_HEADER  # type: ignore[union-attr]
                status, body, headers = error_parts(exc)
                await self._respond(status, body, headers)
        finally:
            if self.status >= 400:  # what the staff dashboard counts (no usage is reported)
                _background(request_errors.arecord(self.status))
            log.info(
                "http.request",
                method="POST",
                path=self.scope["path"],
                status=self.status,
                duration_ms=round((time.perf_counter() - self.started) * 1000, 2),
            )
            structlog.contextvars.clear_contextvars()

    async def _serve(self) -> None:
        self._host()
        body = await self._body()
        principal = await self._principal()
        structlog.contextvars.bind_contextvars(
            organization_id=principal.organization.pk, api_key_id=principal.api_key.pk
        )
        scope_require(principal, "inference", method="POST", path=self.scope["path"])
        self._content_type()
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise exceptions.ParseError(f"JSON parse error - {exc}") from None
        data = validated_reusing(self.api.input_serializer, data)
        timeout = gateway.timeout_for(_text(self.headers.get(b"x-atelier-timeout")))
        model = await self._model(principal.organization, data["model"])
        inference = self.api.prepare(
            data,
            organization_id=principal.organization.pk,
            api_key_id=principal.api_key.pk,
            model=model,
            timeout=timeout,
            reply_to=(await hub()).channel,
            trace_id=self.request_id,
        )
        # The web's line names the worker's id too (the usage record's `request_id`).
        structlog.contextvars.bind_contextvars(inference_request_id=inference.request_id)
        admitted = await admission.aadmit(inference, principal.organization)
        self.extra_headers = admitted.headers()
        subscription = Subscription(
            inference.request_id, total=timeout, silence=settings.INFERENCE_SILENCE_SECONDS
        )
        watcher: asyncio.Future[None] | None = None
        try:  # from admission on, every exit settles the hold (released if nothing ran)
            try:
                await subscription.aopen()  # before sending: no reply can come first
                await gateway.asend(inference)
            except redis.RedisError as exc:
                raise transport_unavailable() from exc
            self.outcome.sent = True
            watcher = asyncio.ensure_future(self._watch_disconnect())
            chunks = self.api.chunks(inference, data)
            if chunks is None:
                reply = await self._final(subscription, inference)
                if reply is not None:
                    await self._respond(200, self.api.body(inference, reply, data), {})
            else:
                await self._stream(subscription, inference, chunks)
        finally:
            if watcher is not None:
                watcher.cancel()
            # After the response, at the usage the worker reports (see asettle_reported).
            _background(admission.asettle_reported(admitted, self.outcome, subscription))

    # -- input ------------------------------------------------------------------------

    def _host(self) -> None:
        """Refuse a Host outside ALLOWED_HOSTS as Django does for every other URL
        (CommonMiddleware's `get_host()`, a 400 through handler400): it is Django's own
        code on this scope, so X-Forwarded-Host (USE_X_FORWARDED_HOST), ports and DEBUG's
        localhost defaults are read the same. Before the key and the body are looked at."""
        try:
            ASGIRequest(self.scope, io.BytesIO()).get_host()
        except DisallowedHost as exc:
            _host_log.error(str(exc), extra={"status_code": 400})
            raise ApiError("Bad request.", code="bad_request") from None
        except UnicodeDecodeError:  # a query string that is not UTF-8: Django's 400 too
            raise ApiError("Bad request.", code="bad_request") from None

    async def _body(self) -> bytes:
        parts = []
        while True:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                raise exceptions.ParseError("The client went away before sending its body.")
            parts.append(message.get("body", b""))
            if not message.get("more_body"):
                return b"".join(parts)

    def _content_type(self) -> None:
        kind = _text(self.headers.get(b"content-type")) or ""
        media = kind.split(";", 1)[0].strip().lower()
        if media != "application/json" and not media.endswith("+json"):
            raise exceptions.UnsupportedMediaType(media or "none")

    async def _principal(self) -> Principal:
        query = self.scope.get("query_string", b"").decode("latin-1")
        pairs = [pair.partition("=")[::2] for pair in query.split("&")] if query else []
        principal = await akey_authenticate(_text(self.headers.get(b"authorization")), pairs)
        if principal is None:
            raise exceptions.NotAuthenticated()
        return principal

    async def _model(self, organization: Organization, model_id: Any) -> ModelRef:
        model_id = gateway.ensure_known(model_id)
        refs = gateway.model_refs
        found = refs.get(organization.pk, model_id, self.api.kind)
        if found is not None:
            return found
        token = refs.token()
        try:
            ref = await sync_to_async(gateway.model_ref)(
                organization=organization, model_id=model_id, kind=self.api.kind
            )
        except ApiError as error:
            refs.put(organization.pk, model_id, self.api.kind, error, token)
            raise
        refs.put(organization.pk, model_id, self.api.kind, ref, token)
        return ref

    # -- replies ----------------------------------------------------------------------

    async def _watch_disconnect(self) -> None:
        while True:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                self.disconnected.set_result(None)
                return

    async def _next(self, subscription: Subscription, inference: InferenceRequest) -> Reply:
        """The next reply; CancelledError-free: raises _Gone if the client left."""
        try:
            reply = await subscription.next_or(self.disconnected)
        except ReplyTimeout as exc:
            await acancel(inference.request_id)  # should it still be running, stop it
            raise gateway.lost(exc.started) from None
        if reply is None:
            await acancel(inference.request_id)
            raise _Gone()
        return self._seen(reply)

    def _seen(self, reply: Reply) -> Reply:
        return self.outcome.seen(reply)

    async def _final(self, subscription: Subscription, inference: InferenceRequest) -> Reply | None:
        try:
            while True:
                reply = await self._next(subscription, inference)
                if reply.type == "start":
                    self.extra_headers.update(_timings(reply.data))
                elif reply.type == "done":
                    return reply
                if reply.type == "error":
                    raise gateway.failure(reply)
        except _Gone:
            return None

    async def _stream(
        self, subscription: Subscription, inference: InferenceRequest, chunks: Any
    ) -> None:
        await self._start(200, b"text/event-stream", STREAM_HEADERS)
        finished = False
        try:
            for first in chunks.opening():
                await self._chunk(event(first))
            while not finished:
                try:
                    reply = await self._next(subscription, inference)
                except ApiError as error:  # lost worker, timeout: said in the stream
                    await self._chunk(error_event(error))
                    break
                if reply.type == "error":
                    finished = True
                    await self._chunk(error_event(gateway.failure(reply)))
                    break
                finished = reply.type == "done"
                for chunk in chunks.on(reply):
                    await self._chunk(event(chunk))
            await self._chunk(b"data: [DONE]\n\n")
        except _Gone:
            if not finished:  # the client left mid-stream: stop the generation
                await acancel(inference.request_id)
            return
        await self._send({"type": "http.response.body", "body": b"", "more_body": False})

    # -- output -----------------------------------------------------------------------

    async def _start(self, status: int, content_type: bytes, headers: dict[str, str]) -> None:
        self.status = status
        elapsed = round((time.perf_counter() - self.started) * 1000)
        raw = [
            (b"content-type", content_type),
            (HEADER.encode(), self.request_id.encode()),
            (b"openai-processing-ms", str(elapsed).encode()),
            *_SECURITY_HEADERS,
            *((k.lower().encode(), str(v).encode()) for k, v in self.extra_headers.items()),
            *((k.lower().encode(), str(v).encode()) for k, v in headers.items()),
        ]
        await self._send({"type": "http.response.start", "status": status, "headers": raw})

    async def _chunk(self, data: bytes) -> None:
        if self.disconnected.done():
            raise _Gone()
        await self._send({"type": "http.response.body", "body": data, "more_body": True})

    async def _respond(self, status: int, body: dict[str, Any], headers: dict[str, str]) -> None:
        raw = orjson.dumps(body)
        await self._start(status, b"application/json", {**headers, "content-length": str(len(raw))})
        await self._send({"type": "http.response.body", "body": raw})


_tasks: set[asyncio.Task[None]] = set()


def _background(work: Any) -> None:
    task = asyncio.ensure_future(work)
    _tasks.add(task)  # a strong reference until it is done
    task.add_done_callback(_tasks.discard)


async def settled() -> None:
    """Once every settlement begun in this process (after its response) is done."""
    while _tasks:
        await asyncio.gather(*_tasks, return_exceptions=True)


class _Gone(Exception):
    """The client disconnected."""


def _timings(start: dict[str, Any]) -> dict[str, str]:
    """From the worker's `start` reply: how long the request waited for a worker (from
    the gateway sending it, the broker included) and for its model to load (a cold
    start), in ms. Plain responses only: a stream's headers are sent before."""
    waited = float(start.get("broker_ms") or 0) + float(start.get("queue_ms") or 0)
    return {
        "x-atelier-queue-ms": str(round(max(0.0, waited), 1)),
        "x-atelier-load-ms": str(round(float(start.get("load_ms") or 0), 1)),
    }


def _text(value: bytes | None) -> str | None:
    return value.decode("latin-1") if value is not None else None
