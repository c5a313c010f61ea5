"""The Files API: OpenAI-compatible, streamed to storage, validated after upload."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from django.conf import settings
from django.core.files.storage import default_storage

from controlplane.datasets.models import File
from tests.support.people import Person
from tests.support.sdk import in_process_sdk

pytestmark = pytest.mark.django_db

CHAT = b"".join(
    json.dumps(
        {
            "messages": [
                {"role": "user", "content": f"q{i}"},
                {"role": "assistant", "content": f"a{i}"},
            ]
        }
    ).encode()
    + b"\n"
    for i in range(20)
)


def upload(
    person: Person,
    content: bytes,
    name: str = "train.jsonl",
    purpose: str = "fine-tune",
    **extra: Any,
) -> Any:
    f = io.BytesIO(content)
    f.name = name
    return person.client.post(
        "/v1/files", {"file": f, "purpose": purpose, **extra}, format="multipart"
    )


def stored_objects() -> list[Path]:
    root = Path(settings.MEDIA_ROOT)
    return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []


@pytest.fixture
def sdk(alice: Person) -> Iterator[openai.OpenAI]:
    with in_process_sdk(alice.key) as client:
        yield client


def test_the_openai_sdk_uploads_lists_reads_and_deletes_files(
    sdk: openai.OpenAI, alice: Person, django_capture_on_commit_callbacks: Any
) -> None:
    with django_capture_on_commit_callbacks(execute=True):
        created = sdk.files.create(file=("train.jsonl", CHAT), purpose="fine-tune")

    assert created.id.startswith("file-")
    assert created.object == "file"
    assert created.bytes == len(CHAT)
    assert created.filename == "train.jsonl"
    assert created.purpose == "fine-tune"
    assert sdk.files.retrieve(created.id).status == "processed"
    assert [f.id for f in sdk.files.list()] == [created.id]
    assert sdk.files.content(created.id).read() == CHAT
    assert sdk.files.delete(created.id).deleted is True
    with pytest.raises(openai.NotFoundError):
        sdk.files.retrieve(created.id)


def test_upload_goes_through_uploaded_processing_to_processed_with_a_report(
    alice: Person, django_capture_on_commit_callbacks: Any
) -> None:
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        body = upload(alice, CHAT).json()
    assert body["status"] == "uploaded"
    for callback in callbacks:
        callback()

    file = alice.client.get(f"/v1/files/{body['id']}").json()
    assert file["status"] == "processed"
    assert file["validation"]["format"] == "chat"
    assert file["validation"]["rows"] == 20
    assert file["validation"]["error_count"] == 0


def test_invalid_rows_end_in_error_with_line_numbers(
    alice: Person, django_capture_on_commit_callbacks: Any
) -> None:
    bad = CHAT + b'{"messages": [{"role": "wizard", "content": "x"}]}\n[1, 2]\n{"messages": '
    with django_capture_on_commit_callbacks(execute=True):
        body = upload(alice, bad).json()

    file = alice.client.get(f"/v1/files/{body['id']}").json()
    assert file["status"] == "error"
    errors = file["validation"]["errors"]
    assert [e["line"] for e in errors] == [21, 22, 23]
    assert file["validation"]["error_count"] == 3
    assert "line 21" in file["status_details"]


def test_storage_names_come_from_the_server_not_the_client(alice: Person) -> None:
    body = upload(alice, b"data", name="notes.txt", purpose="user_data").json()
    file = File.objects.for_organization(alice.organization).get(pk=body["id"])

    assert file.storage_name == f"files/{alice.organization.pk}/{file.pk}"
    assert default_storage.exists(file.storage_name)


@pytest.mark.parametrize(
    ("name", "kept"),
    [
        ("../../etc/passwd", "passwd"),
        ("a/b.jsonl", "b.jsonl"),
        ("..\\win.jsonl", "win.jsonl"),
        ("nul\x00byte.jsonl", "nulbyte.jsonl"),
    ],
)
def test_multipart_filenames_are_reduced_to_a_plain_name_and_never_used_as_paths(
    alice: Person, name: str, kept: str
) -> None:
    body = upload(alice, b"x", name=name, purpose="user_data").json()

    assert body["filename"] == kept
    (stored,) = stored_objects()
    assert stored.relative_to(settings.MEDIA_ROOT).parts == (
        "files",
        alice.organization.pk,
        body["id"],
    )


def test_a_very_long_multipart_filename_is_shortened_keeping_its_extension(
    alice: Person,
) -> None:
    body = upload(alice, b"x", name="x" * 300 + ".jsonl", purpose="user_data").json()
    assert len(body["filename"]) <= 255
    assert body["filename"].endswith(".jsonl")


@pytest.mark.parametrize(
    "name", ["../../etc/passwd", "a/b.jsonl", "nul\x00byte.jsonl", "x" * 256, "", "..", "\t"]
)
def test_dangerous_filenames_in_json_are_refused(alice: Person, name: str) -> None:
    response = alice.client.post(
        "/v1/uploads", {"filename": name, "purpose": "fine-tune", "bytes": 10}, format="json"
    )
    assert response.status_code == 400, response.content
    assert response.json()["error"]["param"] == "filename"


def test_a_file_over_the_size_limit_is_413_with_the_limit(alice: Person, settings: Any) -> None:
    settings.FILE_UPLOAD_MAX_BYTES = 100
    response = upload(alice, b"x" * 101, purpose="user_data")

    assert response.status_code == 413
    assert "100 bytes" in response.json()["error"]["message"]
    assert "/v1/uploads" in response.json()["error"]["message"]
    assert stored_objects() == []


def test_the_storage_quota_is_403_with_the_limit_and_stores_nothing(
    alice: Person, settings: Any
) -> None:
    settings.ORG_STORAGE_QUOTA_BYTES = 150
    assert upload(alice, b"x" * 100, purpose="user_data").status_code == 200

    response = upload(alice, b"y" * 100, purpose="user_data")

    assert response.status_code == 403
    assert response.json()["error"]["code"] == "storage_quota_exceeded"
    assert "150 bytes" in response.json()["error"]["message"]
    assert len(stored_objects()) == 1


def test_empty_file_is_400(alice: Person) -> None:
    response = upload(alice, b"")
    assert response.status_code == 400
    assert stored_objects() == []


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"purpose": "fine-tune"}, "file"),
        ({"purpose": "world-domination", "file": "x"}, "purpose"),
    ],
)
def test_malformed_file_uploads_are_400(alice: Person, body: dict[str, Any], param: str) -> None:
    if body.get("file") == "x":
        f = io.BytesIO(b"x")
        f.name = "a.txt"
        body = {**body, "file": f}
    response = alice.client.post("/v1/files", body, format="multipart")
    assert response.status_code == 400
    assert response.json()["error"]["param"] == param


def test_json_instead_of_multipart_is_415(alice: Person) -> None:
    response = alice.client.post("/v1/files", {"purpose": "fine-tune"}, format="json")
    assert response.status_code == 415


def test_list_filters_by_purpose_and_hides_deleted(alice: Person) -> None:
    a = upload(alice, b"a", name="a.txt", purpose="user_data").json()
    b = upload(alice, CHAT, purpose="batch").json()
    alice.client.delete(f"/v1/files/{a['id']}")

    listed = alice.client.get("/v1/files").json()["data"]
    batch = alice.client.get("/v1/files?purpose=batch").json()["data"]

    assert [f["id"] for f in listed] == [b["id"]]
    assert [f["id"] for f in batch] == [b["id"]]


def test_deleting_a_file_removes_its_object(
    alice: Person, django_capture_on_commit_callbacks: Any
) -> None:
    body = upload(alice, b"data", purpose="user_data").json()
    with django_capture_on_commit_callbacks(execute=True):
        assert alice.client.delete(f"/v1/files/{body['id']}").status_code == 200
    assert stored_objects() == []
    assert alice.client.get(f"/v1/files/{body['id']}/content").status_code == 404


def test_inference_key_cannot_upload(alice: Person) -> None:
    from tests.support.people import client_with

    key = alice.client.post(
        "/v1/organization/api_keys", {"name": "i", "scopes": ["inference"]}, format="json"
    ).json()["value"]
    f = io.BytesIO(CHAT)
    f.name = "t.jsonl"
    response = client_with(key).post(
        "/v1/files", {"file": f, "purpose": "fine-tune"}, format="multipart"
    )
    assert response.status_code == 403
    assert "files.write" in response.json()["error"]["message"]


def test_unauthenticated_upload_is_401(db: None) -> None:
    from rest_framework.test import APIClient

    assert APIClient().post("/v1/files", {}, format="multipart").status_code == 401


@pytest.mark.parametrize("kind", ["gzip", "zip"])
def test_compressed_uploads_are_refused_with_a_clear_reason(
    alice: Person, django_capture_on_commit_callbacks: Any, kind: str
) -> None:
    import gzip
    import zipfile

    if kind == "gzip":
        # A small bomb: 1 KB that would expand to 100 MB. It is never expanded.
        blob = gzip.compress(b"\n" * 100_000_000, compresslevel=9)
    else:
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
            archive.writestr("train.jsonl", CHAT)
        blob = buffer.getvalue()
    with django_capture_on_commit_callbacks(execute=True):
        body = upload(alice, blob, name="train.jsonl").json()

    file = alice.client.get(f"/v1/files/{body['id']}").json()
    assert file["status"] == "error"
    assert kind in file["status_details"]
    assert "uncompressed" in file["status_details"]


def batch_line(custom_id: str, **override: Any) -> bytes:
    row = {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": "m", "messages": [{"role": "user", "content": "hi"}]},
        **override,
    }
    return json.dumps(row).encode() + b"\n"


def test_batch_files_are_checked_as_batch_requests(
    alice: Person, django_capture_on_commit_callbacks: Any
) -> None:
    good = batch_line("a") + batch_line("b")
    bad = (
        batch_line("a")
        + batch_line("a")
        + batch_line("c", method="GET")
        + batch_line("d", url="/v1/files")
        + batch_line("e", body="x")
    )
    with django_capture_on_commit_callbacks(execute=True):
        ok = upload(alice, good, name="requests.jsonl", purpose="batch").json()
        ko = upload(alice, bad, name="requests.jsonl", purpose="batch").json()

    assert alice.client.get(f"/v1/files/{ok['id']}").json()["status"] == "processed"
    report = alice.client.get(f"/v1/files/{ko['id']}").json()["validation"]
    assert [(e["line"], e["field"]) for e in report["errors"]] == [
        (2, "custom_id"),
        (3, "method"),
        (4, "url"),
        (5, "body"),
    ]


def test_eval_files_need_one_json_object_per_line(
    alice: Person, django_capture_on_commit_callbacks: Any
) -> None:
    with django_capture_on_commit_callbacks(execute=True):
        ok = upload(alice, b'{"item": {"q": 1}}\n{"anything": true}\n', purpose="evals").json()
        ko = upload(alice, b'{"item": 1}\n[1]\nnot json\n', purpose="evals").json()

    assert alice.client.get(f"/v1/files/{ok['id']}").json()["status"] == "processed"
    errors = alice.client.get(f"/v1/files/{ko['id']}").json()["validation"]["errors"]
    assert [e["line"] for e in errors] == [2, 3]
