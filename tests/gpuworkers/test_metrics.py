"""The GPU workers' metrics: a real `atelier worker gpu` serves them on its own port
(GPU_METRICS_PORT), summing what its pool processes write; labels stay bounded."""

from __future__ import annotations

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
