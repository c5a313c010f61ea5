"""Inference gateway: limits and timeouts."""

from .env import env

#: Longest a caller waits for a reply (queueing, model loading and generation) before a
#: clean 503; a caller may ask for less with the `x-atelier-timeout` header (seconds).
INFERENCE_TIMEOUT_SECONDS = env.float("INFERENCE_TIMEOUT_SECONDS", default=120.0)
#: Once a worker has started a request, this long without a message means it died.
INFERENCE_SILENCE_SECONDS = env.float("INFERENCE_SILENCE_SECONDS", default=15.0)
#: Caps per request (a plan may lower them when billing lands).
INFERENCE_MAX_N = env.int("INFERENCE_MAX_N", default=8)
INFERENCE_MAX_TOKENS_CAP = env.int("INFERENCE_MAX_TOKENS_CAP", default=4096)
INFERENCE_MAX_INPUTS = env.int("INFERENCE_MAX_INPUTS", default=2048)
INFERENCE_DEFAULT_MAX_TOKENS = env.int("INFERENCE_DEFAULT_MAX_TOKENS", default=256)

#: Most replicas one deployment may ask for (`min_replicas` and `max_replicas`).
INFERENCE_MAX_REPLICAS = env.int("INFERENCE_MAX_REPLICAS", default=8)

#: Requests waiting for an inference worker (all workers' Redis queue) beyond which the
#: gateway answers 503 `overloaded` at once instead of queueing without bound.
INFERENCE_MAX_QUEUED = env.int("INFERENCE_MAX_QUEUED", default=1024)
