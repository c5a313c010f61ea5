"""The same Files and Uploads flows against S3 (django-storages), served by moto in server mode."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import boto3
import httpx
import pytest
from django.core.files.storage import storages
from django.test import override_settings

from tests.support.people import Person
from tests.support.processes import BIN, free_port, stop

pytestmark = [pytest.mark.slow, pytest.mark.django_db]

BUCKET = "atelier-test"


@pytest.fixture(scope="module")
def moto_url() -> Iterator[str]:
    port = free_port()
    process = subprocess.Popen(
        [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                httpx.get(url, timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.2)
        yield url
    finally:
        stop(process)


@pytest.fixture
def s3(moto_url: str) -> Iterator[Any]:
    client = boto3.client(
        "s3",
        endpoint_url=moto_url,
        aws_access_key_id="test",
        aws_secret_access_key="test",
        region_name="us-east-1",
    )
    client.create_bucket(Bucket=BUCKET)
    backend = {
        "BACKEND": "storages.backends.s3.S3Storage",
        "OPTIONS": {
            "bucket_name": BUCKET,
            "endpoint_url": moto_url,
            "access_key": "test",
            "secret_key": "test",
            "region_name": "us-east-1",
            "max_memory_size": 1024 * 1024,
        },
    }
    from django.conf import settings

    with override_settings(STORAGES={**settings.STORAGES, "default": backend}):
        assert type(storages["default"]).__name__ == "S3Storage"
        yield client
    for item in client.list_objects_v2(Bucket=BUCKET).get("Contents", []):
        client.delete_object(Bucket=BUCKET, Key=item["Key"])
    client.delete_bucket(Bucket=BUCKET)


ROWS = b"".join(
    json.dumps(
        {
            "messages": [
                {"role": "user", "content": f"q{i}"},
                {"role": "assistant", "content": f"a{i}" * 50},
            ]
        }
    ).encode()
    + b"\n"
    for i in range(2000)
)


def keys(s3: Any) -> list[str]:
    return sorted(o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET).get("Contents", []))


def test_files_go_to_s3_under_server_generated_keys_and_validate(
    s3: Any, alice: Person, django_capture_on_commit_callbacks: Any
) -> None:
    f = io.BytesIO(ROWS)
    f.name = "../../train.jsonl"
    with django_capture_on_commit_callbacks(execute=True):
        body = alice.client.post(
            "/v1/files", {"file": f, "purpose": "fine-tune"}, format="multipart"
        ).json()

    assert keys(s3) == [f"files/{alice.organization.pk}/{body['id']}"]
    file = alice.client.get(f"/v1/files/{body['id']}").json()
    assert file["status"] == "processed"
    assert file["validation"]["rows"] == 2000
    content = b"".join(alice.client.get(f"/v1/files/{body['id']}/content").streaming_content)
    assert content == ROWS

    with django_capture_on_commit_callbacks(execute=True):
        alice.client.delete(f"/v1/files/{body['id']}")
    assert keys(s3) == []


def test_a_resumable_upload_assembles_from_s3_parts(
    s3: Any, alice: Person, django_capture_on_commit_callbacks: Any
) -> None:
    upload = alice.client.post(
        "/v1/uploads",
        {
            "filename": "big.jsonl",
            "purpose": "fine-tune",
            "bytes": len(ROWS),
            "sha256": hashlib.sha256(ROWS).hexdigest(),
        },
        format="json",
    ).json()
    third = len(ROWS) // 3 + 1
    part_ids = []
    for start in (2 * third, 0, third):  # out of order
        f = io.BytesIO(ROWS[start : start + third])
        f.name = "part"
        part_ids.append(
            alice.client.post(
                f"/v1/uploads/{upload['id']}/parts", {"data": f}, format="multipart"
            ).json()["id"]
        )
    assert len(keys(s3)) == 3

    with django_capture_on_commit_callbacks(execute=True):
        done = alice.client.post(
            f"/v1/uploads/{upload['id']}/complete",
            {"part_ids": [part_ids[1], part_ids[2], part_ids[0]]},
            format="json",
        )

    assert done.status_code == 200, done.content
    file_id = done.json()["file"]["id"]
    assert keys(s3) == [f"files/{alice.organization.pk}/{file_id}"]  # parts cleaned up
    assert alice.client.get(f"/v1/files/{file_id}").json()["status"] == "processed"


def test_readyz_checks_s3(s3: Any, db: None) -> None:
    from django.test import Client

    response = Client().get("/readyz")
    assert response.status_code == 200
    assert response.json()["checks"]["storage"]["ok"] is True
