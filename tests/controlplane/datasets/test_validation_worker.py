"""A file is validated by a real `control` Celery worker, through Redis, after commit."""

from __future__ import annotations

import io
import time
from pathlib import Path

import pytest

from controlplane.datasets import services
from controlplane.datasets.models import File
from tests.support.people import sign_up
from tests.support.processes import worker

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]


def test_the_control_worker_validates_an_uploaded_file(tmp_path: Path, settings: object) -> None:
    settings.CELERY_TASK_ALWAYS_EAGER = False  # type: ignore[attr-defined]
    from controlplane.celery import app

    app.conf.task_always_eager = False
    alice = sign_up("alice@acme.test", "Acme")
    rows = b'{"prompt": "2+2?", "completion": "4"}\n' * 50 + b'{"prompt": "x"}\n'

    try:
        with worker("control", tmp_path):
            file = services.file_create(
                organization=alice.organization,
                user_id=alice.user.pk,
                source=io.BytesIO(rows),
                size=len(rows),
                filename="qa.jsonl",
                purpose="fine-tune",
            )
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                file.refresh_from_db()
                if file.status in ("processed", "error"):
                    break
                time.sleep(0.3)
    finally:
        app.conf.task_always_eager = True

    assert file.status == "error", (tmp_path / "control.log").read_text()[-3000:]
    assert file.validation is not None
    assert file.validation["rows"] == 50
    assert file.validation["errors"][0]["line"] == 51
    assert File.objects.for_organization(alice.organization).count() == 1
