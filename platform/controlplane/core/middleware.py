"""Request id on every log line and response; one structured log line per request (with
the caller's organization and key, the model a job is asked of, the ids in its route);
the route template each request resolved to, for the HTTP metrics (`core.metrics`)."""

from __future__ import annotations

import time
from collections.abc import Callable

import structlog
from django.http import HttpRequest, HttpResponse

from . import logs, metrics
from .metrics_views import metrics_view
from .requestid import HEADER, request_id_from

log = structlog.get_logger("controlplane.request")


class SyncChainMiddleware:
    """Last in MIDDLEWARE, a sync-only no-op: it keeps the whole chain on one thread.

    Under ASGI, Django runs a chain that ends in async-capable middleware in async
    mode, and then every sync-only step (ours, WhiteNoise) and every
    `process_request` hook costs a hop between the event loop and a thread, about
    a dozen per request. Ending the chain with a sync-only step makes Django run it
    all in one thread: measured +70% requests/s (bench/README.md).
    """

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        return self.get_response(request)


class HealthProbeMiddleware:
    """Answers /healthz, /readyz and /metrics before host validation and HTTPS redirects.

    Load balancers, Kubernetes and Prometheus reach pods by IP, with a Host header
    that is not (and should not be) in ALLOWED_HOSTS; the probes reveal nothing
    secret, and /metrics checks who asks itself (`core.metrics_views`).
    """

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        from . import health

        if request.path_info == "/healthz":
            return health.healthz(request)
        if request.path_info == "/readyz":
            return health.readyz(request)
        if request.path_info == "/metrics":
            return metrics_view(request)
        return self.get_response(request)


class RequestIdMiddleware:
    """Binds `request_id` to structlog's context for the request and echoes it back.

    Sync-only on purpose: Django runs sync middleware chains on one thread per
    request under ASGI, so the contextvars bound here reach the view's log lines.
    """

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        request_id = request_id_from(request.headers.get(HEADER))
        request.request_id = request_id  # type: ignore[attr-defined]
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(request_id=request_id)
        model = _model_asked(request)
        if model is not None:
            structlog.contextvars.bind_contextvars(model=model)
        started = time.perf_counter()
        response = self.get_response(request)
        response[HEADER] = request_id
        _note_route(request)
        log.info(
            "http.request",
            method=request.method,
            path=request.path,
            status=response.status_code,
            duration_ms=round((time.perf_counter() - started) * 1000, 2),
            **_caller(request),
        )
        structlog.contextvars.clear_contextvars()
        return response


def _model_asked(request: HttpRequest) -> str | None:
    """The `model` a small JSON POST to the API names (a fine-tuning, compression or
    evaluation job, a batch), bounded; read before the view, which leaves Django the body
    to parse again. Uploads and other bodies are never read here."""
    if request.method != "POST" or not request.path_info.startswith("/v1/"):
        return None
    if request.content_type != "application/json":
        return None
    try:
        length = int(request.META.get("CONTENT_LENGTH") or 0)
    except ValueError:
        return None
    if not 0 < length <= logs.MODEL_BODY_MAX_BYTES:
        return None
    return logs.model_in(request.body)


def _caller(request: HttpRequest) -> dict[str, str]:
    """Who called and which ids the route named, for the request's line: the organization
    and key (an API key request binds them as it authenticates: `accounts.authentication`),
    a session's user, and the route's `*_id` arguments (`job_id`, `file_id`), bounded."""
    fields: dict[str, str] = {}
    user = getattr(request, "user", None)
    if getattr(request, "auth", None) is None and getattr(user, "is_authenticated", False):
        fields["user_id"] = str(user.pk)  # type: ignore[union-attr]
    match = request.resolver_match
    if match is not None:
        for name, value in match.kwargs.items():
            if name.endswith("_id") and (text := logs.bounded(value)) is not None:
                fields[name] = text
    return fields


def _note_route(request: HttpRequest) -> None:
    """Tell the ASGI layer, which counts every request (`core.asgi_limits`), the URL
    pattern this one resolved to: a bounded label, where the path is not."""
    scope = getattr(request, "scope", None)  # ASGIRequest only
    if scope is None:
        return
    match = request.resolver_match
    if match is not None and match.route:
        scope[metrics.SCOPE_ROUTE] = match.route
    else:
        scope[metrics.SCOPE_ROUTE] = metrics.PROBE_ROUTES.get(request.path_info, metrics.UNMATCHED)
