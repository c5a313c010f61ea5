"""Prometheus metrics: the web's `/metrics` (all uvicorn workers summed, internal callers or
the metrics token only), HTTP requests by route template, rate-limit and budget refusals,
and the control worker's own port (queue depth as Redis has it)."""

from __future__ import annotations

import asyncio
import http.client
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from django.conf import settings
from django.test import Client
from prometheus_client import REGISTRY
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from controlplane.core import metrics
from controlplane.core.asgi_limits import BodySizeLimit
from controlplane.jobs.models import Job
from controlplane.limits.budgets import InsufficientQuota
from jobcontracts import queues
from jobcontracts.inference import request_queue
from tests.support import processes
from tests.support.budgets import monthly_budget, reserve, settle
from tests.support.cross_tenant import make_compression_job, make_job
from tests.support.people import Person
from tests.support.processes import Server, asgi_server, free_port, worker

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def local(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


# --- refusals, counted where they are decided ---------------------------------------------


@pytest.mark.django_db
def test_a_rate_limit_refusal_is_counted_once_by_the_limit_that_refused(
    alice: Person, bob: Person
) -> None:
    key_id = bob.membership.api_keys.get().pk
    limits = f"/v1/organization/api_keys/{key_id}/limits"
    assert alice.client.put(limits, {"requests_per_minute": 2}, format="json").status_code == 200
    before = {
        r: local("atelier_rate_limit_refusals_total", reason=r) for r in metrics.RATE_LIMIT_REASONS
    }

    answers = [bob.client.get("/v1/organization/rate_limits").status_code for _ in range(4)]

    assert answers == [200, 200, 429, 429]
    after = {
        r: local("atelier_rate_limit_refusals_total", reason=r) for r in metrics.RATE_LIMIT_REASONS
    }
    assert after["key_requests_per_min"] - before["key_requests_per_min"] == 2
    assert {r: after[r] - before[r] for r in after if r != "key_requests_per_min"} == dict.fromkeys(
        (r for r in after if r != "key_requests_per_min"), 0.0
    )


@pytest.mark.django_db
def test_a_budget_refusal_is_counted_once_as_the_organizations(alice: Person) -> None:
    monthly_budget(alice, "1.00", kind="hard")
    settle(
        reserve(organization_id=alice.organization.pk, api_key_id=None, max_cost=Decimal("1.00")),
        Decimal("1.00"),
    )
    org_before = local("atelier_budget_refusals_total", reason="organization_budget")
    key_before = local("atelier_budget_refusals_total", reason="key_budget")

    with pytest.raises(InsufficientQuota):
        reserve(organization_id=alice.organization.pk, api_key_id=None, max_cost=Decimal("0.01"))

    assert local("atelier_budget_refusals_total", reason="organization_budget") == org_before + 1
    assert local("atelier_budget_refusals_total", reason="key_budget") == key_before


# --- who may read /metrics ----------------------------------------------------------------


def _scrape(address: str, host: str = "10.0.0.9:8000", **headers: str) -> tuple[int, bytes]:
    # Prometheus reaches a pod by IP: a Host header no ALLOWED_HOSTS entry names.
    response = Client(REMOTE_ADDR=address, HTTP_HOST=host).get("/metrics", headers=headers)
    return response.status_code, response.content


@pytest.mark.django_db
def test_metrics_are_served_to_internal_addresses_and_hidden_from_public_ones(
    settings: Any,
) -> None:
    for internal in ("127.0.0.1", "10.4.5.6", "172.20.0.3", "192.168.1.10", "::1"):
        status, body = _scrape(internal)
        assert status == 200, internal
        assert b"atelier_http_requests_total" in body

    for public in ("203.0.113.7", "8.8.8.8", "2001:db8::1"):
        status, body = _scrape(public)
        assert status == 404, public
        assert b'"unknown_url"' in body  # the same answer as any URL that does not exist
        assert b"atelier_" not in body

    # Through a proxy every caller has a private peer address, and X-Forwarded-For is the
    # caller's to write: a proxied request is never internal.
    for forwarded in ({"X-Forwarded-For": "10.0.0.5"}, {"Forwarded": "for=10.0.0.5"}):
        assert _scrape("10.0.0.2", **forwarded)[0] == 404


@pytest.mark.django_db
def test_the_metrics_token_opens_metrics_from_anywhere_and_the_networks_are_a_setting(
    settings: Any,
) -> None:
    settings.METRICS_TOKEN = "s3cret-token"
    assert _scrape("203.0.113.7", Authorization="Bearer s3cret-token")[0] == 200
    assert _scrape("203.0.113.7", Authorization="Bearer s3cret-tokeN")[0] == 404
    assert _scrape("203.0.113.7", Authorization="s3cret-token")[0] == 404
    assert _scrape("10.0.0.2", **{"X-Forwarded-For": "203.0.113.7"})[0] == 404
    assert (
        _scrape(
            "10.0.0.2", **{"X-Forwarded-For": "203.0.113.7", "Authorization": "Bearer s3cret-token"}
        )[0]
        == 200
    )

    settings.METRICS_ALLOWED_NETWORKS = ["198.51.100.0/24"]
    assert _scrape("198.51.100.20")[0] == 200
    assert _scrape("10.4.5.6")[0] == 404
    assert _scrape("127.0.0.1")[0] == 404


def test_a_route_label_is_the_pattern_never_the_path() -> None:
    assert metrics.route_for_path("/v1/chat/completions") == "v1/chat/completions"
    assert metrics.route_for_path("/v1/files/file-abc123") == "v1/files/<str:file_id>"
    assert metrics.route_for_path("/nothing/here") == metrics.UNMATCHED
    assert metrics.method_label("BREW") == "other"
    # Only paths that are their own pattern are remembered: the cache stays bounded.
    for i in range(50):
        metrics.route_for_path(f"/v1/files/file-{i}")
    assert all(
        "<" not in route and path.lstrip("/") == route
        for path, route in metrics._static_routes.items()
    )


# --- the real web: every uvicorn worker counted, summed on one /metrics -------------------

TOKEN = "metrics-token-for-the-test"


@pytest.fixture
def web(tmp_path: Path) -> Iterator[tuple[Server, Path]]:
    data = tmp_path / "data"
    with asgi_server(
        tmp_path / "web", WEB_CONCURRENCY="2", METRICS_TOKEN=TOKEN, ATELIER_DATA_DIR=str(data)
    ) as server:
        port = server.url.rsplit(":", 1)[1]
        yield server, data / "metrics" / f"{socket.gethostname()}-web-{port}"


def _get(url: str, **headers: str) -> httpx.Response:
    return httpx.get(url, headers=headers, timeout=10)  # a new connection each time


def _declared_too_big(server: Server) -> int:
    host, port = server.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    conn.putrequest("POST", "/v1/organization/api_keys")
    conn.putheader("Content-Length", str(50 * 1024 * 1024))
    conn.putheader("Content-Type", "application/json")
    conn.endheaders()
    status = conn.getresponse().status
    conn.close()
    return status


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_the_web_counts_every_request_by_route_and_sums_its_worker_processes(
    web: tuple[Server, Path],
) -> None:
    server, directory = web
    before = parse(_get(server.url + "/metrics").text)
    files_route = {"route": "v1/files/<str:file_id>", "method": "GET", "status": "401"}
    assert value(before, "atelier_http_requests_total", **files_route) == 0

    with ThreadPoolExecutor(8) as pool:
        files = list(
            pool.map(lambda i: _get(f"{server.url}/v1/files/file-{i}").status_code, range(40))
        )
        chats = list(
            pool.map(
                lambda _: (
                    httpx.post(server.url + "/v1/chat/completions", json={}, timeout=10).status_code
                ),
                range(5),
            )
        )
    assert files == [401] * 40
    assert chats == [401] * 5  # answered by the serving router, which Django never sees
    assert _declared_too_big(server) == 413  # refused before any app reads the body

    after = parse(_get(server.url + "/metrics").text)
    assert value(after, "atelier_http_requests_total", **files_route) == 40
    assert (
        value(
            after,
            "atelier_http_request_duration_seconds_count",
            route=files_route["route"],
            method="GET",
        )
        == 40
    )
    assert (
        value(
            after,
            "atelier_http_requests_total",
            route="v1/chat/completions",
            method="POST",
            status="401",
        )
        == 5
    )
    assert (
        value(
            after,
            "atelier_http_requests_total",
            route="v1/organization/api_keys",
            method="POST",
            status="413",
        )
        == 1
    )
    # The scrape before this one is counted too, under its own route.
    assert (
        value(after, "atelier_http_requests_total", route="metrics", method="GET", status="200")
        >= 1
    )
    assert not [key for key in after if any("file-" in v for _, v in key[1])]  # no raw path

    # Both uvicorn workers wrote samples, and /metrics adds them up.
    per_process = []
    for path in sorted(directory.glob("counter_*.db")):
        merged = MultiProcessCollector.merge([str(path)], accumulate=True)
        per_process.append(
            sum(
                s.value
                for family in merged
                for s in family.samples
                if s.name == "atelier_http_requests_total" and s.labels == files_route
            )
        )
    assert sum(per_process) == 40
    assert len([n for n in per_process if n]) == 2, per_process

    # Any process writing into the directory is summed in (what a restarted worker does).
    subprocess.run(
        [
            sys.executable,
            "-c",
            "from controlplane.core import metrics; "
            "metrics.HTTP_REQUESTS.labels(route='v1/files/<str:file_id>', method='GET', "
            "status='401').inc(7)",
        ],
        env=processes.test_env(PROMETHEUS_MULTIPROC_DIR=str(directory)),
        check=True,
    )
    summed = parse(_get(server.url + "/metrics").text)
    assert value(summed, "atelier_http_requests_total", **files_route) == 47


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_the_web_hides_metrics_from_proxied_callers_unless_they_bring_the_token(
    web: tuple[Server, Path],
) -> None:
    server, _ = web
    url = server.url + "/metrics"
    assert _get(url).status_code == 200  # loopback, straight
    # uvicorn trusts loopback's X-Forwarded-For (FORWARDED_ALLOW_IPS): the caller is public.
    refused = _get(url, **{"X-Forwarded-For": "203.0.113.7"})
    assert refused.status_code == 404
    assert refused.json()["error"]["code"] == "unknown_url"
    assert _get(url, **{"X-Forwarded-For": "10.1.1.1"}).status_code == 404  # spoofed
    assert (
        _get(url, **{"X-Forwarded-For": "203.0.113.7", "Authorization": "Bearer nope"}).status_code
        == 404
    )
    allowed = _get(url, **{"X-Forwarded-For": "203.0.113.7", "Authorization": f"Bearer {TOKEN}"})
    assert allowed.status_code == 200
    assert "atelier_http_requests_total" in allowed.text


# --- the control worker's port ------------------------------------------------------------


def _wait_scrape(url: str, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            response = httpx.get(url, timeout=5)
            if response.status_code == 200:
                return response.text
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"nothing served on {url} in {timeout}s")


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_the_control_worker_serves_queue_depth_as_redis_has_it_and_jobs_as_the_db_has_them(
    tmp_path: Path, alice: Person, charlie: Person
) -> None:
    running = [make_job(alice), make_job(charlie)]  # every tenant's jobs, counted together
    Job.objects.dangerously_unscoped().filter(pk=running[0]).update(attempt=3, lost_attempts=1)
    make_compression_job(alice)
    broker = redis.Redis.from_url(settings.CELERY_BROKER_URL)
    lists = {
        queues.GPU_TRAINING: [b"metrics-test-1", b"metrics-test-2", b"metrics-test-3"],
        # A message of priority 3: kombu keeps it in a list of its own.
        f"{queues.GPU_COMPRESSION}\x06\x163": [b"metrics-test-4"],
        request_queue(queues.GPU_INFERENCE): [b"metrics-test-5", b"metrics-test-6"],
    }
    port = free_port()
    try:
        for key, items in lists.items():
            broker.lpush(key, *items)
        with worker(
            "control",
            tmp_path,
            CONTROL_METRICS_PORT=str(port),
            ATELIER_DATA_DIR=str(tmp_path / "data"),
        ):
            samples = parse(_wait_scrape(f"http://127.0.0.1:{port}/metrics"))
            training = broker.llen(queues.GPU_TRAINING)
            compression = sum(
                broker.llen(k)
                for k in (
                    queues.GPU_COMPRESSION,
                    *(f"{queues.GPU_COMPRESSION}\x06\x16{p}" for p in (3, 6, 9)),
                )
            )
            live = broker.llen(request_queue(queues.GPU_INFERENCE))
    finally:
        for key, items in lists.items():
            for item in items:
                broker.lrem(key, 0, item)

    assert training >= 3
    assert compression >= 1
    assert live >= 2
    assert value(samples, "atelier_celery_queue_length", queue=queues.GPU_TRAINING) == training
    assert (
        value(samples, "atelier_celery_queue_length", queue=queues.GPU_COMPRESSION) == compression
    )
    assert (
        value(samples, "atelier_inference_queue_length", queue=queues.GPU_INFERENCE, lane="live")
        == live
    )
    for source in ("celery_queues", "inference_queues", "jobs", "usage_stream"):
        assert value(samples, "atelier_metrics_source_up", source=source) == 1, source
    assert ("atelier_usage_ledger_lag_seconds", frozenset()) in samples

    fine_tuning = Job.objects.dangerously_unscoped().filter(kind="fine_tuning")
    assert value(samples, "atelier_jobs", kind="fine_tuning", state="running") == 2
    assert value(samples, "atelier_jobs", kind="compression", state="succeeded") == 1
    # Every kind and state is a series, at 0 when empty.
    empty = ("atelier_jobs", frozenset({("kind", "evaluation"), ("state", "running")}))
    assert samples[empty] == 0
    assert value(samples, "atelier_job_lost_attempts", kind="fine_tuning") == 1
    # Attempt 3 of one job is two dispatches after its first; attempt 0 of the other none.
    assert value(samples, "atelier_job_redispatches", kind="fine_tuning") == 2
    assert fine_tuning.count() == 2


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_a_stopped_web_worker_leaves_the_live_gauges_and_keeps_its_counts(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with asgi_server(tmp_path / "web", WEB_CONCURRENCY="2", ATELIER_DATA_DIR=str(data)) as server:
        port = server.url.rsplit(":", 1)[1]
        directory = data / "metrics" / f"{socket.gethostname()}-web-{port}"
        for _ in range(10):
            assert _get(server.url + "/healthz").status_code == 200
        assert len(list(directory.glob("gauge_livesum_*.db"))) == 2  # requests in flight
    assert list(directory.glob("gauge_livesum_*.db")) == []  # marked dead at shutdown
    assert len(list(directory.glob("counter_*.db"))) == 2


# --- the ASGI layer that counts ------------------------------------------------------------


def _asgi_call(app: Any, path: str, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    sent: list[dict[str, Any]] = []
    incoming = list(messages)

    async def receive() -> dict[str, Any]:
        return incoming.pop(0) if incoming else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "GET", "path": path, "headers": []}
    asyncio.run(app(scope, receive, send))
    return sent


async def _ok(scope: Any, receive: Any, send: Any) -> None:
    await receive()
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"{}"})


async def _caller_leaves(scope: Any, receive: Any, send: Any) -> None:
    await receive()
    await receive()  # the caller hung up: nothing is answered


def test_the_asgi_layer_counts_a_hang_up_and_nothing_with_metrics_off(settings: Any) -> None:
    body = [{"type": "http.request", "body": b"", "more_body": False}]
    status = {"route": "v1/status", "method": "GET", "status": "200"}
    left = {"route": "v1/status", "method": "GET", "status": "499"}
    before = local("atelier_http_requests_total", **status)
    before_left = local("atelier_http_requests_total", **left)

    _asgi_call(BodySizeLimit(_ok, default_limit=100), "/v1/status", body)
    _asgi_call(BodySizeLimit(_caller_leaves, default_limit=100), "/v1/status", body)
    assert local("atelier_http_requests_total", **status) == before + 1
    assert local("atelier_http_requests_total", **left) == before_left + 1

    settings.METRICS_ENABLED = False  # what the benchmarks compare against
    _asgi_call(BodySizeLimit(_ok, default_limit=100), "/v1/status", body)
    assert local("atelier_http_requests_total", **status) == before + 1


# --- the request id, followed into the worker's request and the usage record ---------


@pytest.mark.django_db
def test_the_callers_request_id_goes_to_the_worker_and_into_the_usage_record(
    alice: Person,
) -> None:
    import dataclasses

    from controlplane.core.serializers import validated_reusing
    from controlplane.inference.models import UsageRecord
    from controlplane.inference.usage import usage_record_batch
    from controlplane.serving.endpoints import ENDPOINTS
    from jobcontracts.inference import InferenceRequest, ModelRef
    from tests.support.usage import usage_report

    model = ModelRef(
        id="atelier-tiny-llama",
        base_name="atelier-tiny-llama",
        base_uri="file:///models/tiny",
        family="llama",
        task="causal_lm",
        context_length=256,
    )
    endpoint = ENDPOINTS["/v1/completions"]
    request = endpoint.prepare(
        validated_reusing(
            endpoint.input_serializer, {"model": model.id, "prompt": "hi", "max_tokens": 4}
        ),
        organization_id=alice.organization.pk,
        api_key_id=None,
        model=model,
        timeout=30,
        trace_id="caller-id-123",
    )
    assert request.trace_id == "caller-id-123"
    # What the worker reads off the list, and what an older gateway's payload gives.
    assert InferenceRequest.from_json(request.to_json()).trace_id == "caller-id-123"
    legacy = request.to_json()
    del legacy["trace_id"]
    assert InferenceRequest.from_json(legacy) == dataclasses.replace(request, trace_id="")

    result = usage_record_batch(
        [
            usage_report(
                request_id="cmpl-traced",
                organization_id=alice.organization.pk,
                trace_id="caller-id-123",
            ),
            usage_report(request_id="cmpl-older-worker", organization_id=alice.organization.pk),
        ]
    )
    assert result.counts["applied"] == 2
    rows = UsageRecord.objects.for_organization(alice.organization)
    assert rows.get(request_id="cmpl-traced").trace_id == "caller-id-123"
    assert rows.get(request_id="cmpl-older-worker").trace_id == ""
    assert list(rows.filter(trace_id="caller-id-123").values_list("request_id", flat=True)) == [
        "cmpl-traced"
    ]
