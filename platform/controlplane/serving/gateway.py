"""From an OpenAI-shaped request to an inference worker and back.

`model_ref` resolves what the caller may call (their organization's deployed
models and every base model) into the worker's `ModelRef` (cached per process:
`model_refs`); `build` makes the request and `asend` pushes it on the worker
queue, one Redis round trip; `failure` and `lost` are the errors of a reply.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import orjson
from django.conf import settings

from controlplane.accounts.keycache import key_cache
from controlplane.core.errors import ApiError, Unavailable
from controlplane.core.ids import new_id
from controlplane.core.redis_clients import async_script
from controlplane.core.ttlcache import Token, TTLCache
from controlplane.inference.deployments import model_is_deployed
from controlplane.modelregistry.models import BaseModel
from controlplane.modelregistry.selectors import model_for_organization, model_not_found
from controlplane.tenancy.models import Organization
from jobcontracts import queues
from jobcontracts.inference import InferenceRequest, ModelRef, Params, Reply, request_queue

#: What each endpoint needs the model to do.
TASK_FOR_KIND = {
    "chat": "causal_lm",
    "completion": "causal_lm",
    "embedding": "embeddings",
    "classification": "classification",
}
ID_PREFIX = {
    "chat": "chatcmpl",
    "completion": "cmpl",
    "embedding": "embd",
    "classification": "clsf",
}


def request_id(kind: str) -> str:
    return new_id(ID_PREFIX[kind]).replace("_", "-", 1)


def model_ref(*, organization: Organization, model_id: str, kind: str) -> ModelRef:
    model = model_for_organization(organization=organization, model_id=model_id)
    task = TASK_FOR_KIND[kind]
    if isinstance(model, BaseModel):
        if task not in model.tasks:
            raise _wrong_task(model_id, kind, list(model.tasks))
        return ModelRef(
            id=model.pk,
            base_name=model.pk,
            base_uri=model.uri,
            family=model.family,
            task=task,
            context_length=model.context_length,
        )
    if model.task != task:
        raise _wrong_task(model_id, kind, [model.task])
    if not model_is_deployed(organization=organization, model=model):
        raise ApiError(
            f"The model '{model_id}' is not deployed: create a deployment first "
            "(POST /v1/deployments with this model).",
            status_code=400,
            param="model",
            code="model_not_deployed",
        )
    base = model.base
    lora = model.artifact_kind == "lora"
    return ModelRef(
        id=model.pk,
        base_name=base.pk,
        base_uri=base.uri,
        family=base.family,
        task=task,
        context_length=base.context_length,
        adapter_uri=model.uri if lora else None,
        weights_uri=None if lora else model.uri,
        labels=tuple(model.labels or ()),
    )


@dataclass(frozen=True, slots=True)
class _Refusal:
    """What `model_ref` refused with, as plain data. Never the exception object itself:
    raising one object again and again grows its `__traceback__` by every request's
    frames, and with them each request's body (issue 19: ~1 MB a request)."""

    error_class: type[ApiError]
    message: str
    status_code: int
    code: str
    param: str | None

    @classmethod
    def of(cls, error: ApiError) -> _Refusal:
        return cls(type(error), str(error.detail), error.status_code, error.code, error.param)

    def error(self) -> ApiError:
        """A fresh exception per request, so nothing of one request outlives it."""
        return self.error_class(
            self.message, status_code=self.status_code, code=self.code, param=self.param
        )


class ModelRefCache:
    """What `model_ref` answered, per (organization, model id, kind), for the asyncio
    path: a hit costs no database query. Entries live API_KEY_CACHE_SECONDS and go at
    once with the organization's keys (`key_cache`): a change to a model, a deployment
    or a base model invalidates through the same signals and Redis channel. A refusal
    is kept as data (`_Refusal`) and raised as a new ApiError on each hit."""

    def __init__(self) -> None:
        self._cache: TTLCache[tuple[str, str, str], ModelRef | _Refusal] = TTLCache(
            lambda: settings.API_KEY_CACHE_SECONDS
        )

    def token(self) -> Token:
        return self._cache.token()

    def get(self, organization_id: str, model_id: str, kind: str) -> ModelRef | None:
        found = self._cache.get((organization_id, model_id, kind))
        if isinstance(found, _Refusal):
            raise found.error()
        return found

    def put(
        self,
        organization_id: str,
        model_id: str,
        kind: str,
        value: ModelRef | ApiError,
        token: Token,
    ) -> None:
        kept = _Refusal.of(value) if isinstance(value, ApiError) else value
        self._cache.put((organization_id, model_id, kind), kept, token)

    def drop(self, organization_ids: set[str] | None) -> None:
        if organization_ids is None:
            self._cache.clear()
            return
        ids = organization_ids
        self._cache.drop_where(lambda key, _: key[0] in ids)


model_refs = ModelRefCache()
key_cache.listeners.append(model_refs.drop)


def _wrong_task(model_id: str, kind: str, tasks: list[str]) -> ApiError:
    return ApiError(
        f"The model '{model_id}' cannot serve {kind} requests (it does: {', '.join(tasks)}).",
        param="model",
        code="model_not_supported",
    )


def build(
    *,
    rid: str,
    organization_id: str,
    api_key_id: str | None,
    kind: str,
    model: ModelRef,
    params: Params,
    messages: list[dict[str, str]] | None = None,
    inputs: list[str] | None = None,
    stream: bool = False,
    timeout: float,
    reply_to: str | None = None,
    trace_id: str = "",
) -> InferenceRequest:
    if params.max_tokens >= model.context_length and kind in ("chat", "completion"):
        raise ApiError(
            f"max_tokens ({params.max_tokens}) must be less than the model's context length "
            f"({model.context_length} tokens), which also holds the prompt.",
            param="max_tokens",
            code="context_length_exceeded",
        )
    now = time.time()
    return InferenceRequest(
        request_id=rid,
        organization_id=organization_id,
        api_key_id=api_key_id,
        kind=kind,
        model=model,
        params=params,
        messages=tuple(messages) if messages is not None else None,
        inputs=tuple(inputs or ()),
        stream=stream,
        deadline=now + timeout,
        sent_at=now,
        reply_to=reply_to,
        trace_id=trace_id,
    )


#: LPUSH the request unless the queue already holds `max` waiting: one round trip.
_ENQUEUE = """
if redis.call('LLEN', KEYS[1]) >= tonumber(ARGV[2]) then return -1 end
return redis.call('LPUSH', KEYS[1], ARGV[1])
"""


def _overloaded() -> ApiError:
    return Unavailable(
        "The inference service is at capacity: too many requests are waiting for a worker. "
        "Retry in a moment.",
        code="overloaded",
    )


def _payload(request: InferenceRequest) -> tuple[list[str], list[Any]]:
    keys = [request_queue(queues.GPU_INFERENCE)]
    # orjson writes the dataclass itself: the same JSON as to_json(), without its deep copy.
    return keys, [orjson.dumps(request), settings.INFERENCE_MAX_QUEUED]


async def asend(request: InferenceRequest) -> None:
    """Hand the request to an inference worker: the Redis request list (see
    jobcontracts.inference), unless INFERENCE_MAX_QUEUED already wait (503)."""
    keys, args = _payload(request)
    if await async_script("inference.enqueue", _ENQUEUE)(keys=keys, args=args) == -1:
        raise _overloaded()


def timeout_for(header: str | None) -> float:
    """The caller's `x-atelier-timeout` (seconds), capped by the server's."""
    limit = float(settings.INFERENCE_TIMEOUT_SECONDS)
    if header is None:
        return limit
    try:
        asked = float(header)
    except ValueError:
        raise ApiError(
            "x-atelier-timeout must be a number of seconds.", code="invalid_header"
        ) from None
    if asked <= 0:
        raise ApiError("x-atelier-timeout must be positive.", code="invalid_header")
    return min(asked, limit)


def failure(reply: Reply) -> ApiError:
    data = reply.data
    status = int(data.get("status") or 500)
    error = ApiError(
        str(data.get("message") or "The model failed to answer."),
        status_code=status,
        code=str(data.get("code") or "inference_failed"),
        param=data.get("param"),
    )
    if data.get("retry_after") is not None:
        error.retry_after = int(data["retry_after"])  # type: ignore[attr-defined]
    return error


def lost(started: bool) -> ApiError:
    """The 503 of a request whose replies stopped (the caller cancels it, should it
    still be running somewhere)."""
    if started:
        message = "The model stopped answering mid-request (its worker was lost); retry."
        code = "worker_lost"
    else:
        message = "No inference worker took the request in time; retry shortly."
        code = "no_capacity"
    return Unavailable(message, code=code)


def ensure_known(model_id: Any) -> str:
    if not isinstance(model_id, str) or not model_id:
        raise model_not_found(str(model_id))
    return model_id
