"""Datasets: immutable, content-hashed versions built from files with a preprocessing recipe."""

from __future__ import annotations

import hashlib
import io
import json
from typing import Any

import pytest

from tests.support.people import Person

pytestmark = pytest.mark.django_db


def row(user: str, assistant: str) -> bytes:
    return (
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": user},
                    {"role": "assistant", "content": assistant},
                ]
            }
        ).encode()
        + b"\n"
    )


FIRST = b"".join(row(f"question {i}", f"answer {i}") for i in range(30))
SECOND = (
    row("question 0", "answer 0")  # an exact duplicate of a row in FIRST
    + row("mail me at jane.doe@example.com", "call +1 415 555 0100")
    + row("  spaced   out  ", "ok")
).rstrip(b"\n")  # no final newline: files must not run into each other


def upload(person: Person, content: bytes, captured: Any, name: str = "t.jsonl") -> str:
    f = io.BytesIO(content)
    f.name = name
    with captured(execute=True):
        body = person.client.post(
            "/v1/files", {"file": f, "purpose": "fine-tune"}, format="multipart"
        ).json()
    return str(body["id"])


def new_dataset(person: Person) -> str:
    response = person.client.post("/v1/datasets", {"name": "support chats"}, format="json")
    assert response.status_code == 201, response.content
    return str(response.json()["id"])


def test_a_version_concatenates_cleans_and_hashes_its_files(
    alice: Person, django_capture_on_commit_callbacks: Any
) -> None:
    files = [
        upload(alice, FIRST, django_capture_on_commit_callbacks),
        upload(alice, SECOND, django_capture_on_commit_callbacks),
    ]
    dataset = new_dataset(alice)

    with django_capture_on_commit_callbacks(execute=True):
        response = alice.client.post(
            f"/v1/datasets/{dataset}/versions",
            {"file_ids": files, "recipe": {"dedupe_exact": True, "scrub_pii": True}},
            format="json",
        )
    assert response.status_code == 201, response.content
    version = alice.client.get(f"/v1/datasets/{dataset}/versions/{response.json()['id']}").json()

    assert version["status"] == "ready", version
    assert version["number"] == 1
    assert version["format"] == "chat"
    assert version["rows"] == 32  # 33 rows in, one exact duplicate out
    assert version["report"]["removed"]["exact_duplicate"] == 1
    assert version["report"]["pii_found"]["email"] == 1
    assert version["report"]["pii_found"]["phone"] == 1
    assert version["recipe"]["scrub_pii"] is True
    from controlplane.datasets.models import DatasetVersion
    from controlplane.datasets.storage import open_object

    stored = DatasetVersion.objects.for_organization(alice.organization).get(pk=version["id"])
    with open_object(stored.storage_name) as fh:
        content = fh.read()
    assert hashlib.sha256(content).hexdigest() == version["sha256"]
    assert b"jane.doe@example.com" not in content
    assert content.count(b"\n") == 32


def test_versions_are_numbered_and_never_rewritten(
    alice: Person, django_capture_on_commit_callbacks: Any
) -> None:
    file = upload(alice, FIRST, django_capture_on_commit_callbacks)
    dataset = new_dataset(alice)
    ids = []
    for recipe in ({}, {"dedupe_near": True}):
        with django_capture_on_commit_callbacks(execute=True):
            ids.append(
                alice.client.post(
                    f"/v1/datasets/{dataset}/versions",
                    {"file_ids": [file], "recipe": recipe},
                    format="json",
                ).json()["id"]
            )

    listed = alice.client.get(f"/v1/datasets/{dataset}/versions").json()["data"]
    assert [v["number"] for v in listed] == [2, 1]
    assert alice.client.get(f"/v1/datasets/{dataset}").json()["latest_version"]["id"] == ids[1]
    assert (
        alice.client.patch(
            f"/v1/datasets/{dataset}/versions/{ids[0]}", {}, format="json"
        ).status_code
        == 405
    )


def test_a_file_that_failed_validation_cannot_be_used(
    alice: Person, django_capture_on_commit_callbacks: Any
) -> None:
    bad = upload(alice, b'{"messages": "nope"}\n', django_capture_on_commit_callbacks)
    dataset = new_dataset(alice)

    response = alice.client.post(
        f"/v1/datasets/{dataset}/versions", {"file_ids": [bad]}, format="json"
    )

    assert response.status_code == 409
    assert response.json()["error"]["code"] == "file_not_processed"


def test_files_of_different_formats_cannot_be_mixed(
    alice: Person, django_capture_on_commit_callbacks: Any
) -> None:
    chat = upload(alice, FIRST, django_capture_on_commit_callbacks)
    qa = upload(alice, b'{"prompt": "p", "completion": "c"}\n', django_capture_on_commit_callbacks)
    dataset = new_dataset(alice)

    response = alice.client.post(
        f"/v1/datasets/{dataset}/versions", {"file_ids": [chat, qa]}, format="json"
    )

    assert response.status_code == 400
    assert response.json()["error"]["code"] == "mixed_formats"


@pytest.mark.parametrize(
    "recipe", [{"dedupe_near": "yes"}, {"explode": True}, {"near_threshold": 2}]
)
def test_a_bad_recipe_is_400(
    alice: Person, django_capture_on_commit_callbacks: Any, recipe: dict[str, Any]
) -> None:
    file = upload(alice, FIRST, django_capture_on_commit_callbacks)
    dataset = new_dataset(alice)
    response = alice.client.post(
        f"/v1/datasets/{dataset}/versions", {"file_ids": [file], "recipe": recipe}, format="json"
    )
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "recipe"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({}, "file_ids"),
        ({"file_ids": []}, "file_ids"),
        ({"file_ids": "file-x"}, "file_ids"),
        ({"file_ids": ["file-x"], "dataset": "ds_x"}, "dataset"),
    ],
)
def test_malformed_version_requests_are_400(
    alice: Person, body: dict[str, Any], param: str
) -> None:
    dataset = new_dataset(alice)
    response = alice.client.post(f"/v1/datasets/{dataset}/versions", body, format="json")
    assert response.status_code == 400
    assert response.json()["error"]["param"].startswith(param)


def test_an_unknown_file_is_404(alice: Person) -> None:
    dataset = new_dataset(alice)
    response = alice.client.post(
        f"/v1/datasets/{dataset}/versions", {"file_ids": ["file-nope"]}, format="json"
    )
    assert response.status_code == 404
