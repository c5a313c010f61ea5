"""The four inference endpoints: the request each body makes, and the response or
stream each reply makes, as OpenAI shapes them (chat completions, completions,
embeddings) and as we do for classifications. Plain classes read by the call
(`call.py`); their request serializers are in `inputs.py`.
"""

from __future__ import annotations

import base64
import time
from typing import Any, ClassVar

import numpy as np
import orjson

from controlplane.core.errors import ApiError, Unavailable
from jobcontracts.inference import InferenceRequest, ModelRef, Params, Reply

from . import gateway, inputs


def transport_unavailable() -> ApiError:
    """503 for a request admitted but not handed to a worker: Redis (the request queue
    or the reply channel) failed. Its budget hold is released by the settle."""
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


def _completion_logprobs(items: list[dict[str, Any]] | None, offset: int) -> dict[str, Any] | None:
    """The legacy completions shape: parallel lists, `top_logprobs` as {token: logprob}
    holding the sampled token too (so up to `logprobs` + 1 entries, as in OpenAI's API),
    `text_offset` counting characters from the start of the prompt."""
    if items is None:
        return None
    tokens, token_logprobs, tops, offsets = [], [], [], []
    for item in items:
        top: dict[str, float] = {}
        for t in item.get("top_logprobs") or []:
            top.setdefault(t["token"], t["logprob"])  # two ids, one text: the likelier
        top.setdefault(item["token"], item["logprob"])
        tokens.append(item["token"])
        token_logprobs.append(item["logprob"])
        tops.append(top)
        offsets.append(offset)
        offset += len(item["token"])
    return {
        "tokens": tokens,
        "token_logprobs": token_logprobs,
        "top_logprobs": tops,
        "text_offset": offsets,
    }


def _prompt_chars(data: dict[str, Any], index: int, n: int) -> int:
    """Characters of the prompt choice `index` continues (choices are prompt-major)."""
    prompts = data.get("prompt") or []
    position = index // max(1, n)
    return len(prompts[position]) if position < len(prompts) else 0


def _finish(reason: Any) -> str:
    return "stop" if reason == "cancelled" else str(reason or "stop")


class Endpoint:
    """One inference endpoint: what its body asks the worker, and how its reply reads."""

    path: ClassVar[str]
    kind: ClassVar[str] = ""
    input_serializer: ClassVar[type[Any]]
    #: Sampling parameters apply (chat and completions).
    sampled: ClassVar[bool] = False

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
        trace_id: str = "",
    ) -> InferenceRequest:
        """The worker's request. `trace_id`: the caller's x-request-id, which follows
        it into the worker's log line and its usage record."""
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
            trace_id=trace_id,
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


#: nginx: do not hold the events back.
STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def error_event(error: ApiError) -> bytes:
    return event({"error": {"message": str(error.detail), "code": error.code}})


def event(payload: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


class _ChatChunks:
    """chat.completion.chunk events for one request."""

    def __init__(
        self,
        inference: InferenceRequest,
        include_usage: bool,
        object_: str,
        data: dict[str, Any] | None = None,
    ) -> None:
        self.inference = inference
        self.include_usage = include_usage
        self.object = object_
        self.created = int(time.time())
        self.data = data or {}
        #: Completions: the `text_offset` the next token of each choice starts at.
        self.offsets: dict[int, int] = {}

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
        shaped = None
        if logprobs:
            if index not in self.offsets:
                self.offsets[index] = _prompt_chars(self.data, index, self.inference.params.n)
            shaped = _completion_logprobs(logprobs, self.offsets[index])
            self.offsets[index] += sum(len(item["token"]) for item in logprobs)
        return {"index": index, "text": text or "", "logprobs": shaped, "finish_reason": finish}

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


class _Generation(Endpoint):
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
        return _ChatChunks(inference, _include_usage(data), cls.chunk_object, data)

    @classmethod
    def choice(cls, c: dict[str, Any], inference: InferenceRequest, data: dict[str, Any]) -> Any:
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
            "choices": [cls.choice(c, inference, data) for c in reply.data.get("choices") or []],
            "usage": _usage(reply.data),
            "system_fingerprint": None,
        }


class ChatCompletions(_Generation):
    path = "/v1/chat/completions"
    kind = "chat"
    input_serializer = inputs.ChatInput
    source = ("messages", "messages")
    object_name = "chat.completion"
    chunk_object = "chat.completion.chunk"

    @classmethod
    def choice(cls, c: dict[str, Any], inference: InferenceRequest, data: dict[str, Any]) -> Any:
        return {
            "index": c["index"],
            "message": {"role": "assistant", "content": c["text"], "refusal": None},
            "logprobs": _chat_logprobs(c.get("logprobs")),
            "finish_reason": _finish(c.get("finish_reason")),
        }


class Completions(_Generation):
    path = "/v1/completions"
    kind = "completion"
    input_serializer = inputs.CompletionInput
    source = ("prompt", "inputs")
    object_name = "text_completion"
    chunk_object = "text_completion"

    @classmethod
    def choice(cls, c: dict[str, Any], inference: InferenceRequest, data: dict[str, Any]) -> Any:
        offset = _prompt_chars(data, int(c["index"]), inference.params.n)
        return {
            "index": c["index"],
            "text": c["text"],
            "logprobs": _completion_logprobs(c.get("logprobs"), offset),
            "finish_reason": _finish(c.get("finish_reason")),
        }


class Embeddings(Endpoint):
    path = "/v1/embeddings"
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


class Classifications(Endpoint):
    """Our extension for classifier fine-tunes: `{model, input}` → labels with scores."""

    path = "/v1/classifications"
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


#: Path → endpoint: what the router serves.
ENDPOINTS: dict[str, type[Endpoint]] = {
    e.path: e for e in (ChatCompletions, Completions, Embeddings, Classifications)
}
