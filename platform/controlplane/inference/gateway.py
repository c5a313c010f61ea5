"""From an OpenAI-shaped request to an inference worker and back.

`model_ref` resolves what the caller may call (their organization's deployed
models and every base model) into the worker's `ModelRef`; `send` publishes the
request by task name on `gpu.inference`; `collect` waits for the final reply.
"""

from __future__ import annotations

import time
from typing import Any

from django.conf import settings

from controlplane.core.errors import ApiError
from controlplane.core.ids import new_id
from controlplane.modelregistry.models import BaseModel, CustomerModel
from controlplane.modelregistry.selectors import model_for_organization, model_not_found
from controlplane.tenancy.models import Organization
from jobcontracts import queues
from jobcontracts.inference import InferenceRequest, ModelRef, Params, Reply

from .replies import ReplyTimeout, Subscription, cancel

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


def _deployed(organization: Organization, model: CustomerModel) -> bool:
    from . import deployments

    return deployments.model_is_deployed(organization=organization, model=model)


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
    if not _deployed(organization, model):
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


def _wrong_task(model_id: str, kind: str, tasks: list[str]) -> ApiError:
    return ApiError(
        f"The model '{model_id}' cannot serve {kind} requests (it does: {', '.join(tasks)}).",
        param="model",
        code="model_not_supported",
    )


def build(
    *,
    rid: str,
    organization: Organization,
    api_key_id: str | None,
    kind: str,
    model: ModelRef,
    params: Params,
    messages: list[dict[str, str]] | None = None,
    inputs: list[str] | None = None,
    stream: bool = False,
    timeout: float,
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
        organization_id=organization.pk,
        api_key_id=api_key_id,
        kind=kind,
        model=model,
        params=params,
        messages=tuple(messages) if messages is not None else None,
        inputs=tuple(inputs or ()),
        stream=stream,
        deadline=now + timeout,
        sent_at=now,
    )


def send(request: InferenceRequest) -> None:
    from controlplane.celery import app

    # ignore_result: replies come on the reply channel; no result-backend subscription.
    app.send_task(
        queues.INFER, args=[request.to_json()], queue=queues.GPU_INFERENCE, ignore_result=True
    )


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


def lost(started: bool, rid: str) -> ApiError:
    cancel(rid)  # should it still be running somewhere, stop it
    if started:
        message = "The model stopped answering mid-request (its worker was lost); retry."
        code = "worker_lost"
    else:
        message = "No inference worker took the request in time; retry shortly."
        code = "no_capacity"
    error = ApiError(message, status_code=503, code=code)
    error.retry_after = 1  # type: ignore[attr-defined]
    return error


def collect(request: InferenceRequest, timeout: float) -> Reply:
    """Send and wait for the final reply (blocking). Raises ApiError on failure."""
    with Subscription(
        request.request_id, total=timeout, silence=settings.INFERENCE_SILENCE_SECONDS
    ) as subscription:
        send(request)
        try:
            for reply in subscription.replies():
                if reply.type == "done":
                    return reply
                if reply.type == "error":
                    raise failure(reply)
        except ReplyTimeout as exc:
            raise lost(exc.started, request.request_id) from None
    raise lost(False, request.request_id)


def ensure_known(model_id: Any) -> str:
    if not isinstance(model_id, str) or not model_id:
        raise model_not_found(str(model_id))
    return model_id
