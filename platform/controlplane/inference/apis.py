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
from django.conf import settings
from django.http import StreamingHttpResponse
from drf_spectacular.utils import extend_schema
from rest_framework.parsers import JSONParser
from rest_framework.request import Request
from rest_framework.response import Response

from controlplane.core.serializers import validated
from controlplane.tenancy.apis_base import OrganizationApi
from jobcontracts.inference import InferenceRequest, Params, Reply

from . import gateway, inputs
from .replies import ReplyTimeout, Subscription, cancel


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
    scopes = {"read": "inference", "write": "inference"}
    parser_classes = [JSONParser]
    kind = ""

    def _request(
        self, request: Request, data: dict[str, Any], *, sampled: bool = False, **extra: Any
    ) -> InferenceRequest:
        self._timeout = gateway.timeout_for(request.headers.get("x-atelier-timeout"))
        self._started = time.perf_counter()
        model = gateway.model_ref(
            organization=self.organization, model_id=data["model"], kind=self.kind
        )
        if sampled:
            extra["params"] = inputs.params_from(data, context_length=model.context_length)
        return gateway.build(
            rid=gateway.request_id(self.kind),
            organization=self.organization,
            api_key_id=self.principal.pk if hasattr(self.principal, "pk") else None,
            kind=self.kind,
            model=model,
            timeout=self._timeout,
            **extra,
        )

    def _respond(self, body: dict[str, Any]) -> Response:
        response = Response(body)
        response["openai-processing-ms"] = str(round((time.perf_counter() - self._started) * 1000))
        return response

    def _stream(self, inference: InferenceRequest, chunks: Any) -> StreamingHttpResponse:
        response = StreamingHttpResponse(
            _sse(inference, self._timeout, chunks), content_type="text/event-stream"
        )
        response["Cache-Control"] = "no-cache"
        response["X-Accel-Buffering"] = "no"  # nginx: do not hold the events back
        response["openai-processing-ms"] = str(round((time.perf_counter() - self._started) * 1000))
        return response


async def _sse(inference: InferenceRequest, timeout: float, chunks: Any) -> AsyncIterator[bytes]:
    """Server-sent events from the reply channel; cancels the generation if the client
    leaves (the ASGI server cancels this generator) before the worker is done."""
    subscription = Subscription(
        inference.request_id, total=timeout, silence=settings.INFERENCE_SILENCE_SECONDS
    )
    finished = False
    try:
        await subscription.aopen()
        gateway.send(inference)
        for first in chunks.opening():
            yield _event(first)
        try:
            async for reply in subscription.areplies():
                if reply.type == "error":
                    finished = True
                    error = gateway.failure(reply)
                    yield _event({"error": {"message": str(error.detail), "code": error.code}})
                    break
                for chunk in chunks.on(reply):
                    yield _event(chunk)
                if reply.type == "done":
                    finished = True
        except ReplyTimeout as exc:
            error = gateway.lost(exc.started, inference.request_id)
            yield _event({"error": {"message": str(error.detail), "code": error.code}})
            finished = True
        yield b"data: [DONE]\n\n"
    finally:
        if not finished:
            cancel(inference.request_id)
        await subscription.aclose()


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


class ChatCompletionsApi(InferenceApi):
    kind = "chat"

    @extend_schema(
        request=inputs.ChatInput, responses={200: dict}, operation_id="create_chat_completion"
    )
    def post(self, request: Request) -> Response | StreamingHttpResponse:
        data = validated(inputs.ChatInput, request.data)
        inference = self._request(
            request,
            data,
            sampled=True,
            messages=data["messages"],
            stream=data["stream"],
        )
        if data["stream"]:
            include = bool((data.get("stream_options") or {}).get("include_usage"))
            return self._stream(inference, _ChatChunks(inference, include, "chat.completion.chunk"))
        reply = gateway.collect(inference, self._timeout)
        return self._respond(
            {
                "id": inference.request_id,
                "object": "chat.completion",
                "created": int(time.time()),
                "model": inference.model.id,
                "choices": [
                    {
                        "index": c["index"],
                        "message": {"role": "assistant", "content": c["text"], "refusal": None},
                        "logprobs": _chat_logprobs(c.get("logprobs")),
                        "finish_reason": _finish(c.get("finish_reason")),
                    }
                    for c in reply.data.get("choices") or []
                ],
                "usage": _usage(reply.data),
                "system_fingerprint": None,
            }
        )


class CompletionsApi(InferenceApi):
    kind = "completion"

    @extend_schema(
        request=inputs.CompletionInput, responses={200: dict}, operation_id="create_completion"
    )
    def post(self, request: Request) -> Response | StreamingHttpResponse:
        data = validated(inputs.CompletionInput, request.data)
        inference = self._request(
            request,
            data,
            sampled=True,
            inputs=data["prompt"],
            stream=data["stream"],
        )
        if data["stream"]:
            include = bool((data.get("stream_options") or {}).get("include_usage"))
            return self._stream(inference, _ChatChunks(inference, include, "text_completion"))
        reply = gateway.collect(inference, self._timeout)
        return self._respond(
            {
                "id": inference.request_id,
                "object": "text_completion",
                "created": int(time.time()),
                "model": inference.model.id,
                "choices": [
                    {
                        "index": c["index"],
                        "text": c["text"],
                        "logprobs": None,
                        "finish_reason": _finish(c.get("finish_reason")),
                    }
                    for c in reply.data.get("choices") or []
                ],
                "usage": _usage(reply.data),
                "system_fingerprint": None,
            }
        )


class EmbeddingsApi(InferenceApi):
    kind = "embedding"

    @extend_schema(
        request=inputs.EmbeddingInput, responses={200: dict}, operation_id="create_embedding"
    )
    def post(self, request: Request) -> Response:
        data = validated(inputs.EmbeddingInput, request.data)
        inference = self._request(
            request,
            data,
            params=Params(max_tokens=1, dimensions=data.get("dimensions")),
            inputs=data["input"],
        )
        reply = gateway.collect(inference, self._timeout)
        as_base64 = data["encoding_format"] == "base64"
        vectors = reply.data.get("embeddings") or []
        usage = _usage(reply.data)
        return self._respond(
            {
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
        )


class ClassificationsApi(InferenceApi):
    """Our extension for classifier fine-tunes: `{model, input}` → labels with scores."""

    kind = "classification"

    @extend_schema(
        request=inputs.ClassificationInput,
        responses={200: dict},
        operation_id="create_classification",
    )
    def post(self, request: Request) -> Response:
        data = validated(inputs.ClassificationInput, request.data)
        inference = self._request(request, data, params=Params(max_tokens=1), inputs=data["input"])
        reply = gateway.collect(inference, self._timeout)
        usage = _usage(reply.data)
        return self._respond(
            {
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
        )
