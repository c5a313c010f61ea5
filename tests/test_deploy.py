"""Deployment files start what `make run` starts, and production settings are safe.

docker-compose.yml and deploy/k8s/ must run each process with the command that
deploy/Procfile gives it; a GPU worker is given the broker and storage only;
`check --deploy` is clean under the production settings. None of this needs
Docker or a cluster: the files are parsed, and Django runs in a subprocess.
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import shutil
import string
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PROCFILE = ROOT / "deploy" / "Procfile"
COMPOSE = ROOT / "docker-compose.yml"
K8S = ROOT / "deploy" / "k8s"

#: Procfile process -> its docker-compose service and its Kubernetes Deployment.
PROCESSES = {
    "web": ("web", "atelier-web"),
    "control": ("control-worker", "atelier-control-worker"),
    "gpu": ("gpu-worker", "atelier-gpu-worker"),
    "inference": ("inference-worker", "atelier-inference-worker"),
    "beat": ("beat", "atelier-beat"),
}
MIGRATE = ["atelier", "manage", "migrate", "--noinput"]
CONTROL_PLANE_SERVICES = ("migrate", "web", "control-worker", "beat")
#: Services and Deployments on GPU hosts: broker and storage settings only.
GPU_SERVICES = ("gpu-worker", "inference-worker")
GPU_DEPLOYMENTS = ("atelier-gpu-worker", "atelier-inference-worker")
#: Settings a GPU host must never hold (see ARCHITECTURE.md: broker and storage only).
FORBIDDEN_ON_GPU = ("DATABASE_URL", "SECRET_KEY", "DJANGO_SETTINGS_MODULE")


def procfile() -> dict[str, list[str]]:
    commands: dict[str, list[str]] = {}
    for raw in PROCFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, _, command = line.partition(":")
        commands[name.strip()] = shlex.split(command)
    return commands


def argv(command: str | list[Any]) -> list[str]:
    return shlex.split(command) if isinstance(command, str) else [str(part) for part in command]


def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def compose_service(name: str) -> dict[str, Any]:
    return compose()["services"][name]


def compose_env(service: dict[str, Any]) -> dict[str, str | None]:
    environment = service.get("environment") or {}
    if isinstance(environment, list):
        return dict((item.split("=", 1) if "=" in item else (item, None)) for item in environment)
    return {key: None if value is None else str(value) for key, value in environment.items()}


def k8s_files() -> list[Path]:
    return sorted(K8S.glob("*.yaml"))


def k8s_objects() -> list[dict[str, Any]]:
    objects: list[dict[str, Any]] = []
    for path in k8s_files():
        objects.extend(doc for doc in yaml.safe_load_all(path.read_text()) if doc)
    return objects


def k8s_object(kind: str, name: str) -> dict[str, Any]:
    for obj in k8s_objects():
        if obj.get("kind") == kind and obj["metadata"]["name"] == name:
            return obj
    raise AssertionError(f"no {kind} named {name} in {K8S}")


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    return workload["spec"]["template"]["spec"]


def only_container(workload: dict[str, Any]) -> dict[str, Any]:
    containers = pod_spec(workload)["containers"]
    assert len(containers) == 1, f"{workload['metadata']['name']} runs one process per pod"
    return containers[0]


def dockerfile_cmd(path: Path) -> list[str]:
    lines = [line for line in path.read_text().splitlines() if line.startswith("CMD ")]
    assert lines, f"{path.name} has no CMD"
    return json.loads(lines[-1].removeprefix("CMD "))


# --- the Procfile is the source of truth ------------------------------------


def test_every_procfile_process_has_a_compose_service_and_a_k8s_deployment() -> None:
    assert set(procfile()) == set(PROCESSES)


# --- docker-compose.yml -------------------------------------------------------


def test_compose_defines_the_database_broker_and_every_process() -> None:
    services = compose()["services"]
    expected = {"postgres", "redis", "migrate", *(svc for svc, _ in PROCESSES.values())}
    assert expected <= set(services)


@pytest.mark.parametrize("process", sorted(PROCESSES))
def test_compose_service_runs_the_procfile_command(process: str) -> None:
    service, _ = PROCESSES[process]
    assert argv(compose_service(service)["command"]) == procfile()[process]


def test_compose_migrate_runs_once_before_the_control_plane() -> None:
    migrate = compose_service("migrate")
    assert argv(migrate["command"]) == MIGRATE
    assert migrate["restart"] == "no"
    for service in ("web", "control-worker", "beat"):
        depends_on = compose_service(service)["depends_on"]
        assert depends_on["migrate"]["condition"] == "service_completed_successfully", service


@pytest.mark.parametrize("service", CONTROL_PLANE_SERVICES)
def test_compose_control_plane_is_configured_through_the_environment(service: str) -> None:
    env = compose_env(compose_service(service))
    assert env["DJANGO_SETTINGS_MODULE"] == "controlplane.settings.production"
    assert (env["SECRET_KEY"] or "").startswith("${SECRET_KEY:?"), "no default secret key"
    assert env["DATABASE_URL"], "DATABASE_URL"
    assert env["REDIS_URL"], "REDIS_URL"
    assert env["ALLOWED_HOSTS"], "ALLOWED_HOSTS"
    assert env["ATELIER_DATA_DIR"] == "/data"


def test_compose_web_listens_on_all_interfaces_on_port_8000() -> None:
    web = compose_service("web")
    env = compose_env(web)
    assert env["HOST"] == "0.0.0.0"
    assert env["PORT"] == "8000"
    assert any(str(port).endswith(":8000") for port in web["ports"])


@pytest.mark.parametrize("service", GPU_SERVICES)
def test_compose_gpu_worker_reserves_an_nvidia_gpu(service: str) -> None:
    devices = compose_service(service)["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)


@pytest.mark.parametrize("service", GPU_SERVICES)
def test_compose_gpu_worker_gets_only_broker_and_storage_settings(service: str) -> None:
    gpu = compose_service(service)
    env = compose_env(gpu)
    assert env["REDIS_URL"]
    assert env["ATELIER_DATA_DIR"] == "/data"
    leaked = [k for k in env if k in FORBIDDEN_ON_GPU or k.upper().startswith("STRIPE")]
    assert leaked == []
    assert "env_file" not in gpu, "an env file could carry database or Stripe credentials"


def test_compose_healthchecks_probe_healthz_postgres_and_redis() -> None:
    def probe(service: str) -> str:
        test = compose_service(service)["healthcheck"]["test"]
        return test if isinstance(test, str) else " ".join(test)

    assert "/healthz" in probe("web")
    assert "pg_isready" in probe("postgres")
    assert "redis-cli ping" in probe("redis")


@pytest.mark.skipif(
    shutil.which("docker") is None
    or subprocess.run(["docker", "compose", "version"], capture_output=True).returncode != 0,
    reason="docker compose is not installed here",
)
def test_docker_compose_config_accepts_the_file() -> None:
    env = {
        **os.environ,
        "SECRET_KEY": "x" * 60,
        "POSTGRES_PASSWORD": "compose-config-check",
    }
    result = subprocess.run(
        ["docker", "compose", "-f", str(COMPOSE), "config", "--quiet"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


# --- Dockerfiles -----------------------------------------------------------------


def test_control_plane_image_is_slim_non_root_and_serves_on_8000() -> None:
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    assert "FROM python:3.11-slim" in dockerfile
    assert "collectstatic" in dockerfile
    assert "EXPOSE 8000" in dockerfile
    users = [line.split()[1] for line in dockerfile.splitlines() if line.startswith("USER ")]
    assert users, "the image must not run as root"
    assert users[-1].split(":")[0] not in {"root", "0"}
    assert dockerfile_cmd(ROOT / "deploy" / "Dockerfile") == procfile()["web"]


def test_gpu_image_is_cuda_based_installs_the_gpu_extra_and_is_non_root() -> None:
    dockerfile = (ROOT / "deploy" / "Dockerfile.gpu").read_text()
    assert "cuda" in dockerfile.lower()
    assert '".[gpu]"' in dockerfile
    users = [line.split()[1] for line in dockerfile.splitlines() if line.startswith("USER ")]
    assert users
    assert users[-1].split(":")[0] not in {"root", "0"}
    assert dockerfile_cmd(ROOT / "deploy" / "Dockerfile.gpu") == procfile()["gpu"]


# --- Kubernetes ----------------------------------------------------------------------


@pytest.mark.parametrize("path", k8s_files(), ids=lambda p: p.name)
def test_k8s_manifest_parses(path: Path) -> None:
    documents = [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    assert documents
    for doc in documents:
        assert doc.get("apiVersion"), path.name
        assert doc.get("kind"), path.name


def test_k8s_kustomization_applies_every_manifest_but_the_secret_example() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    expected = {
        p.name for p in k8s_files() if p.name not in {"kustomization.yaml", "secrets.example.yaml"}
    }
    assert set(kustomization["resources"]) == expected


@pytest.mark.parametrize("process", sorted(PROCESSES))
def test_k8s_deployment_runs_the_procfile_command(process: str) -> None:
    _, deployment = PROCESSES[process]
    container = only_container(k8s_object("Deployment", deployment))
    assert argv(container["command"]) == procfile()[process]


def test_k8s_runs_no_process_the_procfile_does_not_name() -> None:
    allowed = [*procfile().values(), MIGRATE]
    for obj in k8s_objects():
        if obj["kind"] in {"Deployment", "Job"}:
            for container in pod_spec(obj)["containers"]:
                assert argv(container["command"]) in allowed, obj["metadata"]["name"]


def test_k8s_migrate_job_runs_the_same_migration_as_compose() -> None:
    job = k8s_object("Job", "atelier-migrate")
    assert argv(only_container(job)["command"]) == argv(compose_service("migrate")["command"])


def test_k8s_web_is_ready_on_readyz_alive_on_healthz_and_behind_a_service() -> None:
    web = k8s_object("Deployment", "atelier-web")
    container = only_container(web)
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports["http"] == 8000

    service = k8s_object("Service", "atelier-web")
    assert service["spec"]["selector"] == web["spec"]["selector"]["matchLabels"]
    assert service["spec"]["ports"][0]["targetPort"] in {"http", 8000}


def test_k8s_web_probes_send_an_allowed_host() -> None:
    # Django answers 400 to a Host outside ALLOWED_HOSTS; the kubelet sends the pod IP.
    allowed = k8s_object("ConfigMap", "atelier-controlplane")["data"]["ALLOWED_HOSTS"].split(",")
    container = only_container(k8s_object("Deployment", "atelier-web"))
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        if probe in container:
            headers = {h["name"]: h["value"] for h in container[probe]["httpGet"]["httpHeaders"]}
            assert headers["Host"] in allowed, probe


@pytest.mark.parametrize("deployment", GPU_DEPLOYMENTS)
def test_k8s_gpu_worker_gets_one_gpu_and_only_broker_and_storage_settings(deployment: str) -> None:
    gpu = k8s_object("Deployment", deployment)
    container = only_container(gpu)
    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) == 1

    # Every variable it can see: its own env, and the keys of each ConfigMap and
    # Secret it reads (the Secrets as described in secrets.example.yaml).
    names = [var["name"] for var in container.get("env", [])]
    for item in container.get("envFrom", []):
        for kind, ref, field in (
            ("ConfigMap", "configMapRef", "data"),
            ("Secret", "secretRef", "stringData"),
        ):
            if ref in item:
                assert item[ref]["name"] != "atelier-controlplane"
                names += list(k8s_object(kind, item[ref]["name"])[field])
    assert "REDIS_URL" in names
    leaked = [n for n in names if n in FORBIDDEN_ON_GPU or n.upper().startswith("STRIPE")]
    assert leaked == []


def test_k8s_beat_is_a_single_replica_that_never_overlaps() -> None:
    beat = k8s_object("Deployment", "atelier-beat")
    assert beat["spec"]["replicas"] == 1
    assert beat["spec"]["strategy"]["type"] == "Recreate"


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed here")
def test_kustomize_builds_the_manifests() -> None:
    result = subprocess.run(
        ["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    kinds = sorted(doc["kind"] for doc in yaml.safe_load_all(result.stdout) if doc)
    assert kinds.count("Deployment") == len(PROCESSES)
    assert "Job" in kinds
    assert "Service" in kinds


# --- production settings ----------------------------------------------------------------

#: Variables the production settings read; the subprocesses get only what each test gives.
_SETTINGS_VARS = {
    "DJANGO_SETTINGS_MODULE",
    "SECRET_KEY",
    "ALLOWED_HOSTS",
    "DATABASE_URL",
    "REDIS_URL",
    "CELERY_BROKER_URL",
    "DEBUG",
    "SESSION_COOKIE_SECURE",
    "CSRF_COOKIE_SECURE",
}


def production_env(tmp_path: Path, **overrides: str | None) -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if key.removesuffix("_FILE") not in _SETTINGS_VARS and not key.startswith("SECURE_")
    }
    env.update(
        DJANGO_SETTINGS_MODULE="controlplane.settings.production",
        SECRET_KEY="".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(60)),
        ALLOWED_HOSTS="api.example.com",
        DATABASE_URL="postgres://postgres@127.0.0.1:5432/atelier",
        REDIS_URL="redis://127.0.0.1:6379/15",
        ATELIER_DATA_DIR=str(tmp_path / "data"),
        PYTHONPATH=os.pathsep.join([str(ROOT / "platform"), str(ROOT / "workers")]),
    )
    for key, value in overrides.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def django_check(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "django", "check", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )


def test_check_deploy_is_clean_under_production_settings(tmp_path: Path) -> None:
    result = django_check(production_env(tmp_path), "--deploy", "--fail-level", "WARNING")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "WARNINGS" not in output, output


@pytest.mark.parametrize("variable", ["SECRET_KEY", "ALLOWED_HOSTS", "DATABASE_URL", "REDIS_URL"])
def test_production_settings_refuse_to_start_without(tmp_path: Path, variable: str) -> None:
    result = django_check(production_env(tmp_path, **{variable: None}))
    assert result.returncode != 0
    assert variable in result.stderr


def test_production_settings_refuse_an_insecure_secret_key(tmp_path: Path) -> None:
    env = production_env(tmp_path, SECRET_KEY="django-insecure-" + "x" * 50)
    result = django_check(env)
    assert result.returncode != 0
    assert "SECRET_KEY" in result.stderr
