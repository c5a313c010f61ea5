"""OpenAI-compatible inference: chat completions, completions, embeddings, classifications.

Thin views: validate the body, resolve the model the caller may call, hand the
request to an inference worker (gateway.py) and shape its reply as OpenAI does.
Streaming answers are server-sent events read from the reply channel on the
event loop; a client that goes away cancels the generation on the worker.
"""

from __future__ import annotations

import base64
import time
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import orjson
import redis
from django.conf import settings
from django.http import StreamingHttpResponse
from drf_spectacular.utils import extend_schema
from rest_framework.parsers import JSONParser
from rest_framework.request import Request
from rest_framework.response import Response

from controlplane.core.errors import ApiError, Unavailable
from controlplane.core.serializers import validated_reusing
from controlplane.tenancy.apis_base import OrganizationApi
from jobcontracts.inference import InferenceRequest, ModelRef, Params, Reply

from . import admission, gateway, inputs
from .replies import ReplyTimeout, Subscription, cancel


def transport_unavailable() -> ApiError:
    """503 for a request admitted but not handed to a worker: Redis (the request queue
    or the reply channel) failed. Its budget hold is released by the caller's settle."""
    return Unavailable(
        "The inference service could not take the request: its message broker did not "
        "answer. Nothing ran and nothing was charged; retry in a moment."
    )


def _usage(data: dict[str, Any]) -> dict[str, int]:
    usage = data.get("usage") or {}
    prompt = int(usage.get("prompt_tokens") or 0)
    completion = int(usage.get("completion_tokens") or 0)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def _chat_logprobs(items: list[dict[str, Any]] | None) -> dict[str, Any] | None:
    if items is None:
        return None
    return {
        "content": [
            {
                "token": item["token"],
                "logprob": item["logprob"],
                "bytes": list(item["token"].encode()),
                "top_logprobs": [
                    {
                        "token": t["token"],
                        "logprob": t["logprob"],
                        "bytes": list(t["token"].encode()),
                    }
                    for t in item.get("top_logprobs") or []
                ],
            }
            for item in items
        ],
        "refusal": None,
    }


def _finish(reason: Any) -> str:
    return "stop" if reason == "cancelled" else str(reason or "stop")


class InferenceApi(OrganizationApi):
    """One endpoint's logic, shared by two front doors: this DRF view (the test
    client, the schema, INFERENCE_FAST_PATH off) and the asyncio path in front of
    Django (`fastpath.py`, what `atelier web` serves)."""

    scopes = {"read": "inference", "write": "inference"}
    parser_classes = [JSONParser]
    kind = ""
    input_serializer: type[Any]
    #: Sampling parameters apply (chat and completions).
    sampled = False

    @classmethod
    def fields(cls, data: dict[str, Any]) -> dict[str, Any]:
        """What this kind of request sends besides the model and sampling parameters."""
        raise NotImplementedError

    @classmethod
    def prepare(
        cls,
        data: dict[str, Any],
        *,
        organization_id: str,
        api_key_id: str | None,
        model: ModelRef,
        timeout: float,
        reply_to: str | None = None,
    ) -> InferenceRequest:
        extra = cls.fields(data)
        if cls.sampled:
            extra["params"] = inputs.params_from(data, context_length=model.context_length)
        return gateway.build(
            rid=gateway.request_id(cls.kind),
            organization_id=organization_id,
            api_key_id=api_key_id,
            kind=cls.kind,
            model=model,
            timeout=timeout,
            reply_to=reply_to,
            **extra,
        )

    @classmethod
    def chunks(cls, inference: InferenceRequest, data: dict[str, Any]) -> _ChatChunks | None:
        """The stream's chunk maker, or None for a plain response."""
        return None

    @classmethod
    def body(
        cls, inference: InferenceRequest, reply: Reply, data: dict[str, Any]
    ) -> dict[str, Any]:
        raise NotImplementedError

    def handle(self, request: Request) -> Response | StreamingHttpResponse:
        data = validated_reusing(self.input_serializer, request.data)
        timeout = gateway.timeout_for(request.headers.get("x-atelier-timeout"))
        started = time.perf_counter()
        model = gateway.model_ref(
            organization=self.organization, model_id=data["model"], kind=self.kind
        )
        inference = self.prepare(
            data,
            organization_id=self.organization.pk,
            api_key_id=self.principal.pk if hasattr(self.principal, "pk") else None,
            model=model,
            timeout=timeout,
        )
        admitted = admission.admit(inference)
        chunks = self.chunks(inference, data)
        if chunks is not None:
            response: Response | StreamingHttpResponse = StreamingHttpResponse(
                _sse(inference, timeout, chunks, admitted), content_type="text/event-stream"
            )
            for name, value in STREAM_HEADERS.items():
                response[name] = value
        else:
            outcome = admission.Outcome()
            try:
                reply = _collect(inference, timeout, outcome)
            except Exception as exc:
                admission.settle(admitted, outcome.usage)
                # The rate-limit state goes on the error response too (error_parts).
                exc.headers = admitted.headers  # type: ignore[attr-defined]
                raise
            admission.settle(admitted, outcome.usage)
            response = Response(self.body(inference, reply, data))
        for name, value in admitted.headers().items():
            response[name] = value
        response["openai-processing-ms"] = str(round((time.perf_counter() - started) * 1000))
        return response


def _collect(inference: InferenceRequest, timeout: float, outcome: admission.Outcome) -> Reply:
    """Send and wait for the final reply (blocking), every reply seen by `outcome` (what
    is settled). Raises ApiError on failure: the worker's, a lost worker, Redis down."""
    try:
        with Subscription(
            inference.request_id, total=timeout, silence=settings.INFERENCE_SILENCE_SECONDS
        ) as subscription:
            gateway.send(inference)
            outcome.sent = True
            try:
                for reply in subscription.replies():
                    outcome.seen(reply)
                    if reply.type == "done":
                        return reply
                    if reply.type == "error":
                        raise gateway.failure(reply)
            except ReplyTimeout as exc:
                raise gateway.lost(exc.started, inference.request_id) from None
    except redis.RedisError as exc:
        raise transport_unavailable() from exc
    raise gateway.lost(False, inference.request_id)


#: nginx: do not hold the events back.
STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _error_event(error: ApiError) -> bytes:
    return _event({"error": {"message": str(error.detail), "code": error.code}})


async def _sse(
    inference: InferenceRequest, timeout: float, chunks: Any, admitted: admission.Admission
) -> AsyncIterator[bytes]:
    """Server-sent events from the reply channel; cancels the generation if the client
    leaves (the ASGI server cancels this generator) before the worker is done. The
    status (200) is sent before this runs: a failure to send is an error event."""
    subscription = Subscription(
        inference.request_id, total=timeout, silence=settings.INFERENCE_SILENCE_SECONDS
    )
    outcome = admission.Outcome()
    try:
        try:
            await subscription.aopen()
            gateway.send(inference)
        except (redis.RedisError, ApiError) as exc:  # nothing ran: the finally releases it
            yield _error_event(exc if isinstance(exc, ApiError) else transport_unavailable())
            yield b"data: [DONE]\n\n"
            return
        outcome.sent = True
        for first in chunks.opening():
            yield _event(first)
        try:
            async for reply in subscription.areplies():
                outcome.seen(reply)
                if reply.type == "error":
                    yield _error_event(gateway.failure(reply))
                    break
                for chunk in chunks.on(reply):
                    yield _event(chunk)
        except ReplyTimeout as exc:
            yield _error_event(gateway.lost(exc.started, inference.request_id))
        yield b"data: [DONE]\n\n"
    finally:
        if outcome.sent and not outcome.ended:
            cancel(inference.request_id)  # the client left: stop the generation
        # At what the worker reports, waiting for its final reply if the client left.
        await admission.asettle_reported(admitted, outcome, subscription)


def _event(payload: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


class _ChatChunks:
    """chat.completion.chunk events for one request."""

    def __init__(self, inference: InferenceRequest, include_usage: bool, object_: str) -> None:
        self.inference = inference
        self.include_usage = include_usage
        self.object = object_
        self.created = int(time.time())

    def _chunk(self, choices: list[dict[str, Any]], usage: Any = None) -> dict[str, Any]:
        chunk: dict[str, Any] = {
            "id": self.inference.request_id,
            "object": self.object,
            "created": self.created,
            "model": self.inference.model.id,
            "system_fingerprint": None,
            "choices": choices,
        }
        if self.include_usage:
            chunk["usage"] = usage
        return chunk

    def opening(self) -> list[dict[str, Any]]:
        if self.object != "chat.completion.chunk":
            return []
        return [
            self._chunk(
                [
                    {
                        "index": i,
                        "delta": {"role": "assistant", "content": ""},
                        "logprobs": None,
                        "finish_reason": None,
                    }
                    for i in range(self.inference.params.n)
                ]
            )
        ]

    def _choice(self, index: int, text: str | None, finish: str | None, logprobs: Any) -> Any:
        if self.object == "chat.completion.chunk":
            return {
                "index": index,
                "delta": {} if text is None else {"content": text},
                "logprobs": _chat_logprobs(logprobs) if logprobs else None,
                "finish_reason": finish,
            }
        return {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}

    def on(self, reply: Reply) -> list[dict[str, Any]]:
        if reply.type == "delta":
            d = reply.data
            return [
                self._chunk([self._choice(int(d["index"]), d["text"], None, d.get("logprobs"))])
            ]
        if reply.type != "done":
            return []
        out = [
            self._chunk(
                [self._choice(int(c["index"]), None, _finish(c.get("finish_reason")), None)]
            )
            for c in reply.data.get("choices") or []
        ]
        if self.include_usage:
            out.append(self._chunk([], usage=_usage(reply.data)))
        return out


def _include_usage(data: dict[str, Any]) -> bool:
    return bool((data.get("stream_options") or {}).get("include_usage"))


class _GenerationApi(InferenceApi):
    """Chat and text completions: the same request fields, stream and body, but for the
    objects' names and the shape of a choice."""

    sampled = True
    #: The body field the prompt(s) come in, and what the worker gets them as.
    source: tuple[str, str] = ("", "")
    object_name = ""
    chunk_object = ""

    @classmethod
    def fields(cls, data: dict[str, Any]) -> dict[str, Any]:
        field, sent_as = cls.source
        return {sent_as: data[field], "stream": data["stream"]}

    @classmethod
    def chunks(cls, inference: InferenceRequest, data: dict[str, Any]) -> _ChatChunks | None:
        if not data["stream"]:
            return None
        return _ChatChunks(inference, _include_usage(data), cls.chunk_object)

    @classmethod
    def choice(cls, c: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def body(
        cls, inference: InferenceRequest, reply: Reply, data: dict[str, Any]
    ) -> dict[str, Any]:
        return {
            "id": inference.request_id,
            "object": cls.object_name,
            "created": int(time.time()),
            "model": inference.model.id,
            "choices": [cls.choice(c) for c in reply.data.get("choices") or []],
            "usage": _usage(reply.data),
            "system_fingerprint": None,
        }


class ChatCompletionsApi(_GenerationApi):
    kind = "chat"
    input_serializer = inputs.ChatInput
    source = ("messages", "messages")
    object_name = "chat.completion"
    chunk_object = "chat.completion.chunk"

    @classmethod
    def choice(cls, c: dict[str, Any]) -> dict[str, Any]:
        return {
            "index": c["index"],
            "message": {"role": "assistant", "content": c["text"], "refusal": None},
            "logprobs": _chat_logprobs(c.get("logprobs")),
            "finish_reason": _finish(c.get("finish_reason")),
        }

    @extend_schema(
        request=inputs.ChatInput, responses={200: dict}, operation_id="create_chat_completion"
    )
    def post(self, request: Request) -> Response | StreamingHttpResponse:
        return self.handle(request)


class CompletionsApi(_GenerationApi):
    kind = "completion"
    input_serializer = inputs.CompletionInput
    source = ("prompt", "inputs")
    object_name = "text_completion"
    chunk_object = "text_completion"

    @classmethod
    def choice(cls, c: dict[str, Any]) -> dict[str, Any]:
        return {
            "index": c["index"],
            "text": c["text"],
            "logprobs": None,
            "finish_reason": _finish(c.get("finish_reason")),
        }

    @extend_schema(
        request=inputs.CompletionInput, responses={200: dict}, operation_id="create_completion"
    )
    def post(self, request: Request) -> Response | StreamingHttpResponse:
        return self.handle(request)


class EmbeddingsApi(InferenceApi):
    kind = "embedding"
    input_serializer = inputs.EmbeddingInput

    @classmethod
    def fields(cls, data: dict[str, Any]) -> dict[str, Any]:
        return {
            "params": Params(max_tokens=1, dimensions=data.get("dimensions")),
            "inputs": data["input"],
        }

    @classmethod
    def body(
        cls, inference: InferenceRequest, reply: Reply, data: dict[str, Any]
    ) -> dict[str, Any]:
        as_base64 = data["encoding_format"] == "base64"
        vectors = reply.data.get("embeddings") or []
        usage = _usage(reply.data)
        return {
            "object": "list",
            "data": [
                {
                    "object": "embedding",
                    "index": i,
                    "embedding": (
                        base64.b64encode(np.asarray(v, dtype="<f4").tobytes()).decode()
                        if as_base64
                        else v
                    ),
                }
                for i, v in enumerate(vectors)
            ],
            "model": inference.model.id,
            "usage": {
                "prompt_tokens": usage["prompt_tokens"],
                "total_tokens": usage["prompt_tokens"],
            },
        }

    @extend_schema(
        request=inputs.EmbeddingInput, responses={200: dict}, operation_id="create_embedding"
    )
    def post(self, request: Request) -> Response | StreamingHttpResponse:
        return self.handle(request)


class ClassificationsApi(InferenceApi):
    """Our extension for classifier fine-tunes: `{model, input}` → labels with scores."""

    kind = "classification"
    input_serializer = inputs.ClassificationInput

    @classmethod
    def fields(cls, data: dict[str, Any]) -> dict[str, Any]:
        return {"params": Params(max_tokens=1), "inputs": data["input"]}

    @classmethod
    def body(
        cls, inference: InferenceRequest, reply: Reply, data: dict[str, Any]
    ) -> dict[str, Any]:
        usage = _usage(reply.data)
        return {
            "id": inference.request_id,
            "object": "classification",
            "model": inference.model.id,
            "data": [
                {"index": i, **result}
                for i, result in enumerate(reply.data.get("classifications") or [])
            ],
            "usage": {
                "prompt_tokens": usage["prompt_tokens"],
                "total_tokens": usage["prompt_tokens"],
            },
        }

    @extend_schema(
        request=inputs.ClassificationInput,
        responses={200: dict},
        operation_id="create_classification",
    )
    def post(self, request: Request) -> Response | StreamingHttpResponse:
        return self.handle(request)
