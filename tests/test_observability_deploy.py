"""deploy/observability/: Prometheus's scrape config and alert rules pass `promtool` (and
the rules' own unit tests), the Grafana dashboards parse, and every dashboard panel and
alert asks only for metrics the code defines; docker-compose.yml runs Prometheus and
Grafana only under the `observability` profile, on what this folder holds."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
HERE = ROOT / "deploy" / "observability"
DASHBOARDS = sorted((HERE / "grafana" / "dashboards").glob("*.json"))
SOURCES = [*(ROOT / "platform" / "controlplane").rglob("*.py"), *(ROOT / "workers").rglob("*.py")]

#: Where a metric is born: prometheus-client's metric classes, or a collector's families.
DEFINED = re.compile(
    r"(?:Counter|Gauge|Histogram|Summary|GaugeMetricFamily|CounterMetricFamily)\(\s*"
    r"\"(atelier_[a-z0-9_]+)\""
)
#: What an expression names: atelier_ metrics (and series of a histogram's).
NAMED = re.compile(r"\b(atelier_[a-z0-9_]+)\b")
HISTOGRAM_SERIES = ("_bucket", "_sum", "_count")


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        if os.environ.get("CI") == "true":
            pytest.fail("promtool is missing in CI: .ci/run installs Debian's `prometheus`")
        pytest.skip("promtool is not installed here (apt-get install prometheus)")
    return found


def run(*args: str) -> None:
    done = subprocess.run([promtool(), *args], cwd=HERE, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_promtool_accepts_the_alert_rules() -> None:
    run("check", "rules", "alerts.yml")


def test_promtool_accepts_the_scrape_config() -> None:
    run("check", "config", "prometheus.yml")


def test_the_alerts_fire_on_the_series_they_watch() -> None:
    run("test", "rules", "alerts.test.yml")


def defined_metrics() -> set[str]:
    names: set[str] = set()
    for path in SOURCES:
        names |= set(DEFINED.findall(path.read_text()))
    return names


def known(name: str, defined: set[str]) -> bool:
    if name in defined:
        return True
    return any(name.endswith(s) and name.removesuffix(s) in defined for s in HISTOGRAM_SERIES)


def panels(board: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for panel in board.get("panels", []):
        out += [panel, *panels(panel)]  # rows hold panels of their own
    return out


def test_the_metric_names_are_found_in_the_code() -> None:
    defined = defined_metrics()
    # One of each place a metric is defined: the web, a refusal, the control worker's
    # collector, the usage stream, the GPU workers.
    assert {
        "atelier_http_requests_total",
        "atelier_budget_refusals_total",
        "atelier_celery_queue_length",
        "atelier_usage_dead_letter_total",
        "atelier_inference_time_to_first_token_seconds",
    } <= defined


@pytest.mark.parametrize("path", DASHBOARDS, ids=[p.stem for p in DASHBOARDS])
def test_a_dashboard_parses_and_asks_only_for_metrics_the_code_defines(path: Path) -> None:
    board = json.loads(path.read_text())
    assert board["uid"].startswith("atelier-")
    assert board["title"]
    defined = defined_metrics()
    found = panels(board)
    assert found, "a dashboard without panels"
    for panel in found:
        if panel.get("type") == "row":
            continue
        assert panel["datasource"]["uid"] == "prometheus", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            expr = target["expr"]
            names = NAMED.findall(expr)
            assert names or "up{" in expr, f"{panel['title']}: {expr}"
            unknown = [n for n in names if not known(n, defined)]
            assert not unknown, f"{path.name} / {panel['title']}: {unknown} are not defined"


def test_the_dashboards_are_four_with_distinct_uids() -> None:
    boards = [json.loads(p.read_text()) for p in DASHBOARDS]
    assert {p.stem for p in DASHBOARDS} == {"gateway", "inference", "jobs", "billing"}
    assert len({b["uid"] for b in boards}) == len(boards)


def test_every_alert_asks_only_for_metrics_the_code_defines() -> None:
    rules = yaml.safe_load((HERE / "alerts.yml").read_text())
    defined = defined_metrics()
    alerts = [rule for group in rules["groups"] for rule in group["rules"]]
    names = {rule["alert"] for rule in alerts}
    for watched in (
        "AtelierHighErrorRate",
        "AtelierHighLatencyP99",
        "AtelierCeleryQueueGrowing",
        "AtelierJobLeaseExpiries",
        "AtelierUsageStreamLag",
        "AtelierWebhookFailures",
        "AtelierWorkerDown",
    ):
        assert watched in names
    for rule in alerts:
        unknown = [n for n in NAMED.findall(rule["expr"]) if not known(n, defined)]
        assert not unknown, f"{rule['alert']}: {unknown} are not defined"


def test_prometheus_scrapes_the_web_and_every_worker_port() -> None:
    config = yaml.safe_load((HERE / "prometheus.yml").read_text())
    targets = {
        job["job_name"]: (job.get("metrics_path", "/metrics"), job["static_configs"][0]["targets"])
        for job in config["scrape_configs"]
    }
    assert targets == {
        "atelier-web": ("/metrics", ["web:8000"]),
        "atelier-control": ("/metrics", ["control-worker:9101"]),
        "atelier-gpu": ("/metrics", ["gpu-worker:9102"]),
        "atelier-inference": ("/metrics", ["inference-worker:9103"]),
    }


def test_compose_runs_prometheus_and_grafana_only_under_the_observability_profile() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    for name in ("prometheus", "grafana"):
        service = services[name]
        assert service["profiles"] == ["observability"]
        assert all(p.startswith("127.0.0.1:") for p in service["ports"]), "loopback only"
        for volume in service["volumes"]:
            source = volume.split(":", 1)[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), volume
    profiled = {n for n, s in services.items() if s.get("profiles")}
    assert profiled == {"prometheus", "grafana"}  # `docker compose up` starts the rest as before
    provisioned = yaml.safe_load(
        (HERE / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text()
    )
    assert provisioned["datasources"][0]["uid"] == "prometheus"  # what the panels name
