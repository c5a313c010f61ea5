from __future__ import annotations

from collections.abc import Iterator

import pytest
from django.test import Client, override_settings

pytestmark = pytest.mark.django_db


def test_healthz_needs_nothing_but_the_process() -> None:
    response = Client().get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_readyz_checks_database_broker_and_storage() -> None:
    response = Client().get("/readyz")

    assert response.status_code == 200, response.content
    checks = response.json()["checks"]
    assert {name: c["ok"] for name, c in checks.items()} == {
        "database": True,
        "broker": True,
        "storage": True,
    }


@pytest.fixture
def unreachable_broker() -> Iterator[None]:
    from controlplane.celery import app

    saved = app.conf.broker_write_url
    app.conf.broker_write_url = "redis://127.0.0.1:9/0"  # discard port: nothing listens
    try:
        yield
    finally:
        app.conf.broker_write_url = saved


def test_readyz_is_503_when_the_broker_is_down(unreachable_broker: None) -> None:
    response = Client().get("/readyz")

    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "unavailable"
    assert body["checks"]["broker"]["ok"] is False
    assert body["checks"]["database"]["ok"] is True


def test_readyz_is_503_when_storage_is_not_writable(tmp_path: object) -> None:
    blocked = {
        "BACKEND": "django.core.files.storage.FileSystemStorage",
        "OPTIONS": {"location": "/proc/atelier-not-writable"},
    }
    from django.conf import settings

    with override_settings(STORAGES={**settings.STORAGES, "default": blocked}):
        response = Client().get("/readyz")

    assert response.status_code == 503
    assert response.json()["checks"]["storage"]["ok"] is False


def test_probes_answer_whatever_the_host_header(settings: object) -> None:
    # Kubernetes and load balancers probe by pod IP, which is not an allowed host.
    client = Client(HTTP_HOST="10.42.0.17:8000")
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code == 200
    assert client.get("/v1/status").status_code == 400  # everything else still checks it
