"""The GPU workers' metrics: a real `atelier worker gpu` serves them on its own port
(GPU_METRICS_PORT), summing what its pool processes write; labels stay bounded."""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from gpuworkers import metrics
from jobcontracts import queues
from tests.support.processes import free_port, stop

BIN = Path(sys.executable).parent


def _samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_a_refusal_reason_is_one_of_a_fixed_list() -> None:
    def count(reason: str) -> float:
        labels = {"status": "503", "reason": reason}
        return REGISTRY.get_sample_value("atelier_inference_refusals_total", labels) or 0.0

    overloaded, other = count("overloaded"), count("other")
    metrics.refusal(503, "overloaded")
    metrics.refusal(503, "a message a caller wrote, or anything else")
    assert count("overloaded") == overloaded + 1
    assert count("other") == other + 1
    assert metrics.kind_label("chat") == "chat"
    assert metrics.kind_label("something-new") == "other"


def test_each_worker_kind_has_its_own_default_port() -> None:
    assert metrics.port_for({queues.GPU_INFERENCE}, {}) == 9103
    assert metrics.port_for(set(queues.GPU_QUEUES), {}) == 9102
    assert metrics.port_for(set(queues.GPU_QUEUES), {"GPU_METRICS_PORT": "0"}) == 0


@pytest.mark.slow
def test_the_gpu_worker_serves_its_metrics_summed_over_its_processes(tmp_path: Path) -> None:
    port = free_port()
    data = tmp_path / "data"
    env = dict(os.environ)
    env.pop("DJANGO_SETTINGS_MODULE", None)
    env.update(ATELIER_DATA_DIR=str(data), GPU_METRICS_PORT=str(port), PYTHONUNBUFFERED="1")
    log = tmp_path / "gpu.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [str(BIN / "atelier"), "worker", "gpu"], env=env, stdout=out, stderr=subprocess.STDOUT
        )
    url = f"http://127.0.0.1:{port}/metrics"
    try:
        deadline = time.monotonic() + 90
        text = ""
        while time.monotonic() < deadline and not text:
            assert process.poll() is None, log.read_text()[-3000:]
            try:
                text = httpx.get(url, timeout=5).text
            except httpx.HTTPError:
                time.sleep(0.3)
        assert text, log.read_text()[-3000:]
        before = _samples(text)
        lease = ("atelier_job_lease_expiries_total", frozenset({("kind", "fine_tuning")}))
        assert before[lease] == 0

        # What a pool process does when its attempt was superseded: another process's
        # samples, in the directory `atelier worker gpu` made, are in the sum.
        directory = data / "metrics" / f"{socket.gethostname()}-worker-gpu"
        assert directory.is_dir()
        subprocess.run(
            [
                sys.executable,
                "-c",
                "from gpuworkers import metrics; "
                "metrics.JOB_LEASE_EXPIRIES.labels(kind='fine_tuning').inc(2)",
            ],
            env={**env, "PROMETHEUS_MULTIPROC_DIR": str(directory)},
            check=True,
        )
        after = _samples(httpx.get(url, timeout=5).text)
        assert after[lease] == 2
    finally:
        stop(process)


# --- the engine moves them where it does the thing (in-process, this registry) ---------


def _value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_the_engine_counts_requests_tokens_waits_and_loads_once_each(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from tests.gpuworkers.inference_support import (
        model_ref,
        request,
        run,
        running_engine,
        varied_model_dir,
    )

    ref = model_ref(varied_model_dir())
    names = (
        ("atelier_inference_requests_total", {"kind": "completion", "outcome": "completed"}),
        ("atelier_inference_tokens_in_total", {"kind": "completion"}),
        ("atelier_inference_tokens_out_total", {"kind": "completion"}),
        ("atelier_inference_time_to_first_token_seconds_count", {"kind": "completion"}),
        ("atelier_inference_queue_wait_seconds_count", {"lane": "live"}),
        ("atelier_inference_batch_size_count", {}),
        ("atelier_inference_model_loads_total", {"outcome": "ok"}),
        ("atelier_inference_model_loads_total", {"outcome": "failed"}),
        ("atelier_inference_cold_starts_total", {"kind": "completion"}),
        ("atelier_inference_refusals_total", {"status": "503", "reason": "model_unavailable"}),
        ("atelier_inference_refusals_total", {"status": "503", "reason": "insufficient_memory"}),
    )
    before = {(n, frozenset(labels.items())): _value(n, **labels) for n, labels in names}
    kv_before = _value("atelier_inference_memory_used_bytes", use="kv_cache")

    def moved(name: str, **labels: str) -> float:
        return _value(name, **labels) - before[(name, frozenset(labels.items()))]

    requests = [
        dataclasses.replace(request(ref, max_tokens=5), trace_id=f"trace-{i}") for i in range(3)
    ]
    missing = model_ref(Path("/nonexistent/model"))
    with caplog.at_level(logging.INFO, logger="gpuworkers.inference.scheduler"):
        with running_engine() as (engine, channel):
            replies = run(engine, channel, *requests)
            assert _value("atelier_inference_memory_budget_bytes") == engine.budget
            assert _value("atelier_inference_models_loaded") == 1
            assert _value("atelier_inference_memory_used_bytes", use="weights") > 0
            # Rows have left: their caches are no longer counted.
            assert _value("atelier_inference_memory_used_bytes", use="kv_cache") == kv_before
            (refused,) = run(engine, channel, request(missing, max_tokens=2))
        with running_engine(memory_budget_mb=0.01) as (small, small_channel):
            (too_big,) = run(small, small_channel, request(ref, max_tokens=2))
    assert all(r.type == "done" for r in replies)
    assert refused.type == "error"
    assert refused.data["code"] == "model_unavailable"
    assert too_big.type == "error"
    assert too_big.data["code"] == "insufficient_memory"

    usages = [r.data["usage"] for r in replies]
    assert moved("atelier_inference_requests_total", kind="completion", outcome="completed") == 3
    assert moved("atelier_inference_tokens_in_total", kind="completion") == sum(
        u["prompt_tokens"] for u in usages
    )
    assert moved("atelier_inference_tokens_out_total", kind="completion") == sum(
        u["completion_tokens"] for u in usages
    )
    assert moved("atelier_inference_time_to_first_token_seconds_count", kind="completion") == 3
    assert moved("atelier_inference_queue_wait_seconds_count", lane="live") == 3
    assert moved("atelier_inference_batch_size_count") >= 1
    assert moved("atelier_inference_model_loads_total", outcome="ok") == 1
    assert moved("atelier_inference_model_loads_total", outcome="failed") == 1
    assert moved("atelier_inference_cold_starts_total", kind="completion") == 3
    assert moved("atelier_inference_refusals_total", status="503", reason="model_unavailable") == 1
    assert (
        moved("atelier_inference_refusals_total", status="503", reason="insufficient_memory") == 1
    )

    # One line per request, with its trace id and counts, never its text.
    lines = [r for r in caplog.records if r.getMessage() == "inference.request"]
    traces = sorted(getattr(r, "trace_id", None) for r in lines)
    assert traces == ["", "", "trace-0", "trace-1", "trace-2"]
    done = next(r for r in lines if getattr(r, "trace_id", None) == "trace-1")
    assert done.__dict__["outcome"] == "completed"
    assert done.__dict__["request_id"] == requests[1].request_id
    assert done.__dict__["completion_tokens"] == usages[1]["completion_tokens"]
    assert done.__dict__["ttft_ms"] >= 0
    assert done.__dict__["queue_ms"] >= 0
    assert not any("the cat sat" in str(r.__dict__) for r in lines)


def test_the_usage_report_carries_the_trace_id_and_old_payloads_still_read() -> None:
    from jobcontracts.inference import InferenceRequest, UsageReport
    from tests.gpuworkers.inference_support import model_ref, request, varied_model_dir

    sent = dataclasses.replace(request(model_ref(varied_model_dir())), trace_id="req_abc")
    assert InferenceRequest.from_json(sent.to_json()).trace_id == "req_abc"
    old = sent.to_json()
    del old["trace_id"]  # what an older gateway sends
    assert InferenceRequest.from_json(old).trace_id == ""
    report = UsageReport.from_json(
        {
            "request_id": "cmpl-1",
            "organization_id": "org-1",
            "api_key_id": None,
            "model": "m",
            "kind": "completion",
            "prompt_tokens": 1,
            "completion_tokens": 2,
            "status": "completed",
            "latency_ms": 1.0,
            "at": 1.0,
        }
    )
    assert report.trace_id == ""


def test_a_superseded_attempt_and_an_attempt_s_end_are_counted_by_kind() -> None:
    lease = _value("atelier_job_lease_expiries_total", kind="compression")
    superseded = _value("atelier_job_attempts_total", kind="fine_tuning", outcome="superseded")
    metrics.lease_expired("compression")
    metrics.attempt_ended("fine_tuning", "stale")
    metrics.attempt_ended("something-new", "stale")
    assert _value("atelier_job_lease_expiries_total", kind="compression") == lease + 1
    assert (
        _value("atelier_job_attempts_total", kind="fine_tuning", outcome="superseded")
        == superseded + 1
    )
    assert _value("atelier_job_attempts_total", kind="other", outcome="superseded") >= 1


def test_metrics_enabled_reads_as_the_webs_setting() -> None:
    assert metrics._enabled({}) is True
    assert metrics._enabled({"METRICS_ENABLED": "1"}) is True
    assert metrics._enabled({"METRICS_ENABLED": "true"}) is True
    for off in ("0", "false", "off", "no"):
        assert metrics._enabled({"METRICS_ENABLED": off}) is False


def test_training_counts_its_tokens_and_a_superseded_attempt_once(tmp_path: Path) -> None:
    from gpuworkers.training.engine import run_training
    from jobcontracts.training import Signal
    from tests.gpuworkers.helpers import Reports, ScriptedSignals, make_spec

    tokens = _value("atelier_job_tokens_total", kind="fine_tuning")
    expiries = _value("atelier_job_lease_expiries_total", kind="fine_tuning")
    spec = make_spec(tmp_path, repeat=4, n_epochs=3)
    # After two steps the lease expired and attempt 2 took over.
    outcome = run_training(
        spec, Reports(), signal_reader=ScriptedSignals(None, None, None, Signal(2, "run"))
    )

    assert outcome.status == "stale"
    assert outcome.trained_tokens > 0
    assert _value("atelier_job_tokens_total", kind="fine_tuning") == tokens + outcome.trained_tokens
    assert _value("atelier_job_lease_expiries_total", kind="fine_tuning") == expiries + 1
    # No attempt runs in this process now: no throughput.
    assert _value("atelier_job_tokens_per_second", kind="fine_tuning") == 0
