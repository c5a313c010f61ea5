"""Prometheus metrics of the control plane: the web's HTTP metrics, refusals, and the
machinery the control worker's collector plugs into (`controlplane.celery`).

Multiprocess. `atelier web` runs WEB_CONCURRENCY uvicorn worker processes; each writes
its samples to files under `PROMETHEUS_MULTIPROC_DIR` (prometheus-client's multiprocess
mode, chosen when the module is first imported), which `atelier web` empties at every
start (`cli.metrics_dir`), and `/metrics` sums them (`registry()`). A worker that exits
marks itself dead (`lifespan`), so its live gauges stop counting; its counters stay in the sum.

Bounded labels. No label holds a value a caller chooses: `route` is the URL pattern the
request resolved to (`v1/files/<str:file_id>`, never `/v1/files/file-abc`; `unmatched`
for a URL that resolves to nothing), `method` is one of HTTP's methods or `other`,
`status` a status code, `reason` one of a fixed list. No organization, key, request or
model id is ever a label: per-tenant numbers come from the usage records and the ledger
(the staff dashboard), which hold them exactly.
"""

from __future__ import annotations

import atexit
import os
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

import structlog
from django.urls import Resolver404, resolve
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.registry import Collector

log = structlog.get_logger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

#: Where HTTP's own methods end; anything else is counted as `other`.
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
#: The route label of a URL that resolves to no pattern (a 404 of the URL itself).
UNMATCHED = "unmatched"
#: URLs answered before URL resolution (`core.middleware.HealthProbeMiddleware`).
PROBE_ROUTES = {"/healthz": "healthz", "/readyz": "readyz", "/metrics": "metrics"}
#: The ASGI scope key the Django middleware writes the resolved route into.
SCOPE_ROUTE = "atelier.route"

HTTP_REQUESTS = Counter(
    "atelier_http_requests_total",
    "HTTP requests answered by the web, by route template, method and status.",
    ["route", "method", "status"],
)
HTTP_DURATION = Histogram(
    "atelier_http_request_duration_seconds",
    "Time from the request's arrival to the end of its response body (a stream: all of "
    "it), by route template and method.",
    ["route", "method"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)
HTTP_IN_FLIGHT = Gauge(
    "atelier_http_requests_in_flight",
    "HTTP requests being answered now, all web processes together.",
    multiprocess_mode="livesum",
)

#: `<scope>_<unit>_per_<span>` of the window that refused (limits.ratelimit.Window), or
#: `request_too_large` (a request larger than a whole minute's token limit).
RATE_LIMIT_REASONS = (
    *(
        f"{scope}_{unit}_per_{span}"
        for scope in ("organization", "key")
        for unit, span in (("requests", "min"), ("tokens", "min"), ("requests", "day"))
    ),
    "request_too_large",
)
RATE_LIMIT_REFUSALS = Counter(
    "atelier_rate_limit_refusals_total",
    "Requests refused with 429 rate_limit_exceeded, by the limit that refused them.",
    ["reason"],
)
#: Whose hard budget refused: the organization's or the API key's.
BUDGET_REASONS = ("organization_budget", "key_budget")
BUDGET_REFUSALS = Counter(
    "atelier_budget_refusals_total",
    "Requests refused with 429 insufficient_quota (a hard budget is spent), by whose.",
    ["reason"],
)
#: Stripe webhook events applied, by type (the types the platform handles, else
#: "other": Stripe has hundreds) and outcome (`processed`, `duplicate`, `failed`: recorded
#: and never retried, `ignored_type`, `ignored_unknown_customer`, `retry`: a transient
#: error, answered 500 so that Stripe sends it again).
WEBHOOK_OUTCOMES = (
    "processed",
    "duplicate",
    "failed",
    "ignored_type",
    "ignored_unknown_customer",
    "retry",
)
WEBHOOK_EVENTS = Counter(
    "atelier_webhook_events_total",
    "Stripe webhook events received with a valid signature, by event type and outcome.",
    ["type", "outcome"],
)
#: Outbound webhooks (controlplane.notifications), sent by the control worker: each
#: attempt by event type (the fixed list of notifications.events) and outcome
#: (succeeded, retrying: failed and sent again later, failed: for good).
WEBHOOK_DELIVERIES = Counter(
    "atelier_webhook_deliveries_total",
    "Webhook delivery attempts to customers' endpoints, by event type and outcome.",
    ["type", "outcome"],
)
WEBHOOK_DELIVERY_SECONDS = Histogram(
    "atelier_webhook_delivery_duration_seconds",
    "Time of one webhook delivery attempt, connection and response status included.",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
for _reason in RATE_LIMIT_REASONS:  # every series exists (at 0) from the start
    RATE_LIMIT_REFUSALS.labels(reason=_reason)
for _reason in BUDGET_REASONS:
    BUDGET_REFUSALS.labels(reason=_reason)


def multiprocess() -> bool:
    # Set at all (even empty) is what makes prometheus-client write files: the same test.
    return MULTIPROC_ENV in os.environ


def process_dead() -> None:
    """This process's live gauges (requests in flight) leave the sum; its counters stay."""
    if multiprocess():
        mark_process_dead(os.getpid())  # type: ignore[no-untyped-call]


if multiprocess():
    atexit.register(process_dead)


async def lifespan(
    receive: Callable[[], Awaitable[Any]], send: Callable[[Any], Awaitable[None]]
) -> None:
    """ASGI lifespan of a web process. A uvicorn worker ends by re-raising the SIGTERM it
    caught, so no atexit runs: its shutdown event is where it can still say it is gone."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            process_dead()
            await send({"type": "lifespan.shutdown.complete"})
            return


def registry() -> CollectorRegistry:
    """What a scrape reads: every process's files summed (multiprocess), or this
    process's own metrics."""
    if not multiprocess():
        return REGISTRY
    summed = CollectorRegistry()
    MultiProcessCollector(summed)  # type: ignore[no-untyped-call]
    return summed


def method_label(method: str) -> str:
    return method if method in METHODS else "other"


_static_routes: dict[str, str] = {}


def route_for_path(path: str) -> str:
    """The route template of a request that never reached Django's middleware (served by
    the serving router, or refused by size first): resolved here. Only paths that *are*
    their pattern (no converter) are remembered, so the cache stays as small as the URL map."""
    known = _static_routes.get(path)
    if known is not None:
        return known
    probe = PROBE_ROUTES.get(path)
    if probe is not None:
        return probe
    try:
        route = resolve(path).route
    except Resolver404:
        return UNMATCHED
    except Exception:  # no URLconf (a bare ASGI app in a test): not a reason to fail
        return UNMATCHED
    if path.lstrip("/") == route:
        _static_routes[path] = route
    return route or UNMATCHED


def observe_http(scope: Mapping[str, Any], status: int, seconds: float) -> None:
    route = scope.get(SCOPE_ROUTE) or route_for_path(scope.get("path", ""))
    method = method_label(scope.get("method", ""))
    HTTP_REQUESTS.labels(route=route, method=method, status=str(status)).inc()
    HTTP_DURATION.labels(route=route, method=method).observe(seconds)


class HttpTimer:
    """One HTTP request's measurement, from arrival to the end of its response."""

    __slots__ = ("scope", "started", "status")

    def __init__(self, scope: Mapping[str, Any]) -> None:
        self.scope = scope
        self.started = time.perf_counter()
        #: 500 is what uvicorn answers when the app fails before starting a response;
        #: 499 (set by the caller) when the client hung up first.
        self.status = 500
        HTTP_IN_FLIGHT.inc()

    def done(self) -> None:
        HTTP_IN_FLIGHT.dec()
        observe_http(self.scope, self.status, time.perf_counter() - self.started)


class NoTimer:
    """What `HttpTimer` is with METRICS_ENABLED off: nothing."""

    __slots__ = ("status",)

    def __init__(self) -> None:
        self.status = 0

    def done(self) -> None:
        pass


class SourcesCollector(Collector):
    """Metrics computed when scraped, from what the process that serves them registered:
    each source returns metric families (the control worker registers queue depth, jobs
    by state and the usage stream's lag: `controlplane.celery`). A source that fails is
    left out of that scrape and counted, so one down dependency hides nothing else."""

    def __init__(self, sources: Mapping[str, Callable[[], Iterable[Metric]]]) -> None:
        self.sources = dict(sources)

    def collect(self) -> Iterable[Metric]:
        failed = GaugeMetricFamily(
            "atelier_metrics_source_up",
            "1 when the source's numbers were read at this scrape, 0 when it failed.",
            labels=["source"],
        )
        out: list[Metric] = []
        for name, source in self.sources.items():
            try:
                out += list(source())
            except Exception as exc:
                log.warning("metrics.source_failed", source=name, error=str(exc))
                failed.add_metric([name], 0)
            else:
                failed.add_metric([name], 1)
        return [*out, failed]
