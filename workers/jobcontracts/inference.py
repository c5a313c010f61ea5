"""The inference contract: a request the gateway sends an inference worker, and its replies.

Requests. The gateway LPUSHes `InferenceRequest.to_json()` (JSON) onto the Redis
(`REDIS_URL`) list `request_queue("gpu.inference")` and inference workers BRPOP
it: one Redis round trip each way, where a Celery task costs several milliseconds
of publishing, consuming and pool hand-off per request (measured: bench/README.md)
— more than the whole latency budget of a proxied call. A client may also send the
request by task name, as the only argument of Celery task `queues.INFER` on queue
`gpu.inference`. Neither is ever redelivered: a caller waits seconds, and a
request run twice would be billed twice.

Replies do not go through the broker (too slow for token streaming): the worker
publishes `Reply` messages, JSON, carrying their `request_id`, on the pub/sub
channel `reply_channel(request_id, reply_to)`: the gateway process's own channel,
subscribed once when the process starts (so no subscribe round trip per request,
and no message can be missed), or for callers without one a per-request channel
subscribed *before* sending.

While a started request has nothing else to say (a long non-streamed generation),
the worker sends a `heartbeat` every few seconds, so a gateway can tell a busy
worker from a dead one by silence.

Cancellation goes the other way: the gateway sets the Redis key
`cancel_key(request_id)`; the worker checks it between
decoding steps and stops that sequence, reporting the tokens produced so far.

Usage: for every request it ran (completed, cancelled or failed part-way), the
worker reports exactly one `UsageReport`: an entry on the Redis stream
`USAGE_STREAM` (XADD, pipelined with the final reply), which the control plane
reads in batches through a consumer group and acknowledges only after the rows
are committed (a report can also be sent by task name, Celery task
`queues.CONTROL_USAGE_REPORT` on the control queue). Either way the control plane
stores it under a unique `request_id`, so a report delivered twice (a consumer
killed between commit and acknowledgement) counts once.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Final

KINDS: Final = ("chat", "completion", "embedding", "classification")
MODEL_TASKS: Final = ("causal_lm", "classification", "embeddings")

# Reply types, in order: start?, (delta | heartbeat)*, (done | error).
START: Final = "start"
DELTA: Final = "delta"
DONE: Final = "done"
ERROR: Final = "error"
#: Sent after `start` when a request has been silent for a while; no data.
HEARTBEAT: Final = "heartbeat"

# Finish reasons, as OpenAI's.
STOP: Final = "stop"
LENGTH: Final = "length"
CANCELLED: Final = "cancelled"


def reply_channel(request_id: str, reply_to: str | None = None) -> str:
    """Where a request's replies go: the gateway process's own channel (`reply_to`,
    one subscription per web process) or else a channel of the request's own."""
    return reply_to or f"atelier:inference:{request_id}"


def process_channel(process_id: str) -> str:
    """A web process's reply channel: every request it sends names it as `reply_to`.

    A message on it is one reply's JSON object, or a JSON array of replies (of
    any of the process's requests, each request's in order): a worker sends
    everything it has for one process in one message.
    """
    return f"atelier:inference:process:{process_id}"


def request_queue(queue: str) -> str:
    """The Redis list a queue's requests wait in (LPUSH by the gateway, BRPOP by workers)."""
    return f"atelier:inference:queue:{queue}"


def batch_queue(queue: str) -> str:
    """The low-priority list of Batch API requests for a queue (LPUSH by the control
    plane's batch runner): a worker takes from it only when the live list is empty,
    and holds only a few of them at once, so live traffic keeps its latency."""
    return f"atelier:inference:batch:{queue}"


#: Request ids of Batch API lines start with this: billed by the batch (at the batch
#: price, once per line), not by the usage stream.
BATCH_REQUEST_PREFIX: Final = "batch-"


#: The Redis stream of usage reports (XADD by workers, read by the control plane's
#: consumer group `USAGE_GROUP`, acknowledged only after the rows are committed).
USAGE_STREAM: Final = "atelier:inference:usage"
USAGE_GROUP: Final = "control"


def cancel_key(request_id: str) -> str:
    return f"atelier:inference:{request_id}:cancel"


def known_fields(cls: Any, data: dict[str, Any]) -> dict[str, Any]:
    """`data` without the keys `cls` (a dataclass) does not have: a payload from a newer
    gateway or worker, with a field added since, is still read by an older one (which
    ignores what it does not know), so either side can be upgraded first."""
    names = {f.name for f in fields(cls)}
    return {key: value for key, value in data.items() if key in names}


@dataclass(frozen=True)
class ModelRef:
    #: The public id the caller used (a base model name or `ft:…`).
    id: str
    #: The base model's Hugging Face-format directory (URI), shared by all its adapters.
    base_name: str
    base_uri: str
    family: str
    task: str  # one of MODEL_TASKS
    context_length: int
    #: A LoRA adapter directory applied on top of the base, or None.
    adapter_uri: str | None = None
    #: A full fine-tune's own directory (replaces base_uri for loading), or None.
    weights_uri: str | None = None
    labels: tuple[str, ...] = ()


@dataclass(frozen=True)
class Params:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    stop: tuple[str, ...] = ()
    seed: int | None = None
    logprobs: bool = False
    top_logprobs: int = 0
    #: Embeddings: truncate to this many dimensions (then re-normalise), or None.
    dimensions: int | None = None


@dataclass(frozen=True)
class InferenceRequest:
    request_id: str
    organization_id: str
    api_key_id: str | None
    kind: str  # one of KINDS
    model: ModelRef
    params: Params
    #: chat: [{role, content}]; others: None.
    messages: tuple[dict[str, str], ...] | None = None
    #: completion prompts, embedding inputs or texts to classify.
    inputs: tuple[str, ...] = ()
    stream: bool = False
    #: Unix time after which the worker drops the request unanswered (the caller gave up).
    deadline: float = 0.0
    sent_at: float = 0.0
    #: The gateway process's reply channel (`process_channel`); None: `reply_channel(id)`.
    reply_to: str | None = None
    #: The caller's `x-request-id` (or the one the gateway made): it follows the request
    #: into the worker's log line and the usage record. A Batch API line: its batch's id
    #: and custom_id. Empty from callers that send none (older gateways, tests).
    trace_id: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> InferenceRequest:
        data = known_fields(cls, data)
        model = known_fields(ModelRef, data["model"])
        model["labels"] = tuple(model.get("labels") or ())
        data["model"] = ModelRef(**model)
        params = known_fields(Params, data.get("params") or {})
        params["stop"] = tuple(params.get("stop") or ())
        data["params"] = Params(**params)
        if data.get("messages") is not None:
            data["messages"] = tuple(dict(m) for m in data["messages"])
        data["inputs"] = tuple(data.get("inputs") or ())
        request = cls(**data)
        if request.kind not in KINDS:
            raise ValueError(f"unknown inference kind {request.kind!r}")
        return request


@dataclass(frozen=True)
class Reply:
    """One message on the reply channel.

    - start: {"queue_ms", "load_ms", "broker_ms"?} once the request is scheduled on a
      model (queue_ms: waiting in the worker, model loading excluded; broker_ms: from
      `sent_at` to the worker, when `sent_at` is set).
    - delta: {"index", "text", "logprobs"?: [{token, logprob, top_logprobs}]}, streaming only.
    - heartbeat: {} after `start`, when nothing else was sent for a few seconds.
    - done: chat/completion {"choices": [{index, text, finish_reason, logprobs?}]};
      embedding {"embeddings": [[float, …]]}; classification
      {"classifications": [{label, score, scores: {label: p}}]}; always
      {"usage": {prompt_tokens, completion_tokens, total_tokens}}.
    - error: {"status", "code", "message"} (503 cold/overloaded, 400 bad input, 500), and
      "usage" (as done's) when the request ran before it failed: what it is billed for.
    """

    type: str
    request_id: str
    data: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Reply:
        return cls(**data)

    @classmethod
    def batch_from_json(cls, data: dict[str, Any] | list[dict[str, Any]]) -> list[Reply]:
        """One message of a reply channel: a reply, or (on a `process_channel`) a list."""
        return [cls(**item) for item in data] if isinstance(data, list) else [cls(**data)]


@dataclass(frozen=True)
class UsageReport:
    request_id: str
    organization_id: str
    api_key_id: str | None
    model: str
    kind: str
    prompt_tokens: int
    completion_tokens: int
    #: completed | cancelled | failed
    status: str
    latency_ms: float
    at: float
    #: The request's `trace_id` (the caller's x-request-id); "" from older workers.
    trace_id: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> UsageReport:
        return cls(**known_fields(cls, data))
