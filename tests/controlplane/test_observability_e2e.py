"""Observability on the real processes: `atelier web`, `atelier worker control` and
`atelier worker inference`, each scraped on its own metrics endpoint, and their logs.

Real traffic (completions, one rate-limit refusal) moves the counters by exactly what
happened: the web's requests by route and status, the worker's requests and tokens as
the usage records sum them, refusals by reason. One caller's `x-request-id` is found
in the web's line, in the worker's `inference.request` line and in its usage record;
the prompt's text is in no log.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

from controlplane.inference.models import UsageRecord
from controlplane.modelregistry.models import BaseModel
from jobcontracts import queues
from tests.support.jobs import purge_broker
from tests.support.models import tiny_model_dir
from tests.support.people import Person
from tests.support.processes import Server, asgi_server, free_port, worker

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

LLAMA = "atelier-tiny-llama"
#: In the prompt only: never in a log line.
SECRET_WORD = "zanzibarquokka"
ENV = {
    # A loaded 2-core machine: a worker may take a while to start the first request.
    "INFERENCE_SILENCE_SECONDS": "60",
    "TORCH_NUM_THREADS": "1",
    "OMP_NUM_THREADS": "1",
}
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    from prometheus_client.parser import text_string_to_metric_families

    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


@dataclass
class Stack:
    web: Server
    control_url: str
    inference_url: str
    control_log: Path
    inference_log: Path

    def scrape(self) -> dict[str, Samples]:
        return {
            "web": parse(_get(self.web.url + "/metrics")),
            "control": parse(_get(self.control_url)),
            "inference": parse(_get(self.inference_url)),
        }


def _get(url: str, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while True:
        try:
            response = httpx.get(url, timeout=5)
            if response.status_code == 200:
                return response.text
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"nothing served on {url} in {timeout}s")
        time.sleep(0.3)


def _json_lines(path: Path) -> list[dict[str, Any]]:
    lines = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            lines.append(record)
    return lines


def _until(check: Callable[[], bool], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


@pytest.fixture
def stack(alice: Person, tmp_path: Path) -> Iterator[Stack]:
    purge_broker()
    BaseModel.objects.create(
        id=LLAMA,
        family="llama",
        tasks=["causal_lm"],
        methods=["supervised"],
        adapters=["lora", "full"],
        context_length=256,
        uri=tiny_model_dir("llama").as_uri(),
        price_per_1k_training_tokens=Decimal("0.0008"),
    )
    data = str(tmp_path / "data")  # each process's metrics directory, under it
    control_port, inference_port = free_port(), free_port()
    with (
        worker(
            "control",
            tmp_path / "control",
            CONTROL_METRICS_PORT=str(control_port),
            ATELIER_DATA_DIR=data,
            **ENV,
        ),
        worker(
            "inference",
            tmp_path / "inference",
            INFERENCE_METRICS_PORT=str(inference_port),
            ATELIER_DATA_DIR=data,
            **ENV,
        ),
        asgi_server(tmp_path / "web", WEB_CONCURRENCY="2", ATELIER_DATA_DIR=data, **ENV) as web,
    ):
        inference_log = tmp_path / "inference" / "inference.log"
        _until(
            lambda: "inference.ready" in inference_log.read_text(errors="replace"),
            "the inference worker",
            timeout=180,
        )
        yield Stack(
            web=web,
            control_url=f"http://127.0.0.1:{control_port}/metrics",
            inference_url=f"http://127.0.0.1:{inference_port}/metrics",
            control_log=tmp_path / "control" / "control.log",
            inference_log=tmp_path / "inference" / "inference.log",
        )


def complete(stack: Stack, key: str, request_id: str, timeout: float = 60) -> httpx.Response:
    return httpx.post(
        stack.web.url + "/v1/completions",
        json={
            "model": LLAMA,
            "prompt": f"the {SECRET_WORD} sat on",
            "max_tokens": 4,
            "temperature": 0,
        },
        headers={"Authorization": f"Bearer {key}", "x-request-id": request_id},
        timeout=timeout,
    )


def test_real_traffic_moves_every_processs_counters_by_what_happened_and_one_id_follows_it(
    stack: Stack, alice: Person, bob: Person
) -> None:
    # Bob's key may make one request a minute (set before the web ever reads its limits).
    key_id = bob.membership.api_keys.get().pk
    limits = f"/v1/organization/api_keys/{key_id}/limits"
    assert alice.client.put(limits, {"requests_per_minute": 1}, format="json").status_code == 200
    warm = complete(stack, alice.key, f"obs-warm-{uuid.uuid4().hex[:8]}", timeout=180)
    assert warm.status_code == 200, warm.text  # loads the model: not measured
    _until(lambda: UsageRecord.objects.dangerously_unscoped().count() == 1, "the warm-up's usage")
    route = {"route": "v1/completions", "method": "POST"}

    def web_count(status: str) -> float:
        samples = parse(_get(stack.web.url + "/metrics"))
        return value(samples, "atelier_http_requests_total", **route, status=status)

    # The web counts a request once its response has ended, which can be after the worker
    # (and the usage record) are done with it: wait for the count, then take `before`.
    _until(lambda: web_count("200") == 1, "the web to count the warm-up")
    before = stack.scrape()

    run = uuid.uuid4().hex[:8]
    ids = [f"obs-{run}-{i}" for i in range(4)]
    answers = [complete(stack, alice.key, rid) for rid in ids[:3]]
    answers.append(complete(stack, bob.key, ids[3]))
    refused = complete(stack, bob.key, f"obs-{run}-refused")
    assert [a.status_code for a in answers] == [200] * 4, [a.text for a in answers]
    assert refused.status_code == 429, refused.text
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert [a.headers["x-request-id"] for a in answers] == ids

    records: list[UsageRecord] = []

    def recorded() -> bool:
        records[:] = UsageRecord.objects.dangerously_unscoped().filter(trace_id__in=ids)
        return len(records) == len(ids)

    _until(recorded, "the usage records")
    prompt = sum(r.prompt_tokens for r in records)
    completion = sum(r.completion_tokens for r in records)
    assert prompt > 0
    assert completion > 0
    by_trace = {r.trace_id: r for r in records}
    assert {by_trace[rid].request_id for rid in ids} == {a.json()["id"] for a in answers}

    finished = {"kind": "completion", "outcome": "completed"}

    def inference_done() -> bool:
        samples = parse(_get(stack.inference_url))
        return value(samples, "atelier_inference_requests_total", **finished) - value(
            before["inference"], "atelier_inference_requests_total", **finished
        ) >= len(ids)

    _until(inference_done, "the worker's counters")
    _until(lambda: web_count("200") >= 5 and web_count("429") >= 1, "the web's counters")
    after = stack.scrape()

    def moved(process: str, name: str, **labels: str) -> float:
        return value(after[process], name, **labels) - value(before[process], name, **labels)

    # The web: requests by route template and status (both of its processes summed).
    assert moved("web", "atelier_http_requests_total", **route, status="200") == 4
    assert moved("web", "atelier_http_requests_total", **route, status="429") == 1
    assert moved("web", "atelier_http_request_duration_seconds_count", **route) == 5
    assert moved("web", "atelier_rate_limit_refusals_total", reason="key_requests_per_min") == 1
    assert moved("web", "atelier_rate_limit_refusals_total", reason="key_tokens_per_min") == 0

    # The inference worker: what ran, exactly as the usage records sum it.
    assert moved("inference", "atelier_inference_requests_total", **finished) == 4
    assert moved("inference", "atelier_inference_tokens_in_total", kind="completion") == prompt
    assert moved("inference", "atelier_inference_tokens_out_total", kind="completion") == completion
    for name in ("queue_wait_seconds", "time_to_first_token_seconds"):
        labels = {"lane": "live"} if name == "queue_wait_seconds" else {"kind": "completion"}
        assert moved("inference", f"atelier_inference_{name}_count", **labels) == 4, name
    assert moved("inference", "atelier_inference_batch_size_count") >= 1  # decoding steps
    assert value(after["inference"], "atelier_inference_models_loaded") == 1
    assert value(after["inference"], "atelier_inference_model_loads_total", outcome="ok") == 1
    assert value(after["inference"], "atelier_inference_cold_starts_total", kind="completion") == 1
    assert value(after["inference"], "atelier_inference_memory_budget_bytes") > 0
    assert value(after["inference"], "atelier_inference_memory_used_bytes", use="weights") > 0
    # A refusal the web made is not the worker's: none of its reasons moved.
    assert not [
        key
        for key in after["inference"]
        if key[0] == "atelier_inference_refusals_total"
        and after["inference"][key] != before["inference"].get(key, 0.0)
    ]

    # The control worker: nothing waits for an inference worker now.
    assert (
        value(
            after["control"],
            "atelier_inference_queue_length",
            queue=queues.GPU_INFERENCE,
            lane="live",
        )
        == 0
    )
    assert value(after["control"], "atelier_metrics_source_up", source="inference_queues") == 1

    # One id across the processes: the web's line, the worker's line, the usage record.
    traced = ids[1]
    record = by_trace[traced]
    web_lines = [
        line
        for line in _json_lines(stack.web.log)
        if line.get("event") == "http.request" and line.get("request_id") == traced
    ]
    assert len(web_lines) == 1, web_lines
    assert web_lines[0]["status"] == 200
    assert web_lines[0]["organization_id"] == alice.organization.pk
    assert web_lines[0]["inference_request_id"] == record.request_id
    worker_lines = [
        line
        for line in _json_lines(stack.inference_log)
        if line.get("event") == "inference.request" and line.get("trace_id") == traced
    ]
    assert len(worker_lines) == 1, worker_lines
    line = worker_lines[0]
    assert line["request_id"] == record.request_id
    assert line["organization_id"] == alice.organization.pk
    assert line["model"] == LLAMA
    assert line["outcome"] == "completed"
    assert line["prompt_tokens"] == record.prompt_tokens
    assert line["completion_tokens"] == record.completion_tokens
    assert line["queue_ms"] >= 0
    assert line["ttft_ms"] >= 0
    refused_lines = [
        line
        for line in _json_lines(stack.web.log)
        if line.get("request_id") == f"obs-{run}-refused" and line.get("event") == "http.request"
    ]
    assert [line["status"] for line in refused_lines] == [429]

    # Prompts and keys are in no log.
    for log in (stack.web.log, stack.inference_log, stack.control_log):
        text = log.read_text(errors="replace")
        assert SECRET_WORD not in text, log
        assert alice.key not in text, log
        assert bob.key not in text, log


# --- a fine-tune: the GPU worker's port and the job's numbers -------------------------


def test_a_real_fine_tune_moves_the_gpu_workers_counters_by_the_jobs_own_numbers(
    alice: Person, tmp_path: Path
) -> None:
    import io

    from controlplane.jobs.models import Job, JobStatus
    from tests.support.jobs import chat_rows, register_tiny_llama
    from tests.support.plans import set_plan

    purge_broker()
    set_plan("free", concurrent_fine_tuning_jobs=4)
    register_tiny_llama()
    gpu_port = free_port()
    jobs_env = {"JOBS_HEARTBEAT_SECONDS": "1", "OMP_NUM_THREADS": "1"}
    with (
        worker("control", tmp_path / "control", **jobs_env),
        worker("gpu", tmp_path / "gpu", GPU_METRICS_PORT=str(gpu_port), **jobs_env),
    ):
        url = f"http://127.0.0.1:{gpu_port}/metrics"
        before = parse(_get(url, timeout=120))
        upload = io.BytesIO(chat_rows(8))
        upload.name = "train.jsonl"
        answer = alice.client.post(
            "/v1/files", {"file": upload, "purpose": "fine-tune"}, format="multipart"
        )
        assert answer.status_code == 200, answer.content
        file_id = answer.json()["id"]
        _until(
            lambda: alice.client.get(f"/v1/files/{file_id}").json()["status"] == "processed",
            "the file's validation",
            timeout=120,
        )
        created = alice.client.post(
            "/v1/fine_tuning/jobs",
            {
                "model": LLAMA,
                "training_file": file_id,
                "seed": 3,
                "method": {
                    "type": "supervised",
                    "supervised": {"hyperparameters": {"n_epochs": 1, "batch_size": 2}},
                },
            },
            format="json",
        )
        assert created.status_code == 200, created.content
        job_id = created.json()["id"]

        def job() -> Job:
            return Job.objects.dangerously_unscoped().get(pk=job_id)

        _until(lambda: job().status == JobStatus.SUCCEEDED, "the fine-tune", timeout=300)
        trained = job().trained_tokens

        def counted() -> bool:
            samples = parse(_get(url))
            ended = {"kind": "fine_tuning", "outcome": "succeeded"}
            return (
                value(samples, "atelier_job_attempts_total", **ended)
                - value(before, "atelier_job_attempts_total", **ended)
                >= 1
            )

        _until(counted, "the attempt's end on the GPU worker's port")
        after = parse(_get(url))

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert trained > 0
    assert moved("atelier_job_tokens_total", kind="fine_tuning") == trained
    assert moved("atelier_job_attempts_total", kind="fine_tuning", outcome="succeeded") == 1
    assert moved("atelier_job_lease_expiries_total", kind="fine_tuning") == 0
    assert value(after, "atelier_job_tokens_per_second", kind="fine_tuning") == 0  # none runs
    # The job's id follows it through the GPU worker's log.
    gpu_lines = _json_lines(tmp_path / "gpu" / "gpu.log")
    assert any(line.get("job_id") == job_id for line in gpu_lines)
