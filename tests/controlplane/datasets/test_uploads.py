"""Resumable uploads: parts in any order, re-sent parts, checksum-verified completion."""

from __future__ import annotations

import hashlib
import io
import threading
import time
from datetime import timedelta
from typing import Any

import pytest
from django.core.files.storage import default_storage
from django.db import connection, transaction
from django.utils import timezone

from controlplane.celery import app as celery_app
from controlplane.datasets.models import File, Upload, UploadPart
from controlplane.datasets.services import upload_expire_due
from controlplane.datasets.tasks import expire_uploads
from tests.support.people import Person

pytestmark = pytest.mark.django_db

CONTENT = b"".join(b'{"text": "row %d", "label": "x"}\n' % i for i in range(3000))
SHA = hashlib.sha256(CONTENT).hexdigest()


def start(person: Person, content: bytes = CONTENT, **extra: Any) -> dict[str, Any]:
    response = person.client.post(
        "/v1/uploads",
        {
            "filename": "big.jsonl",
            "purpose": "fine-tune",
            "bytes": len(content),
            "mime_type": "application/jsonl",
            **extra,
        },
        format="json",
    )
    assert response.status_code == 200, response.content
    return response.json()  # type: ignore[no-any-return]


def send_part(person: Person, upload_id: str, data: bytes) -> Any:
    f = io.BytesIO(data)
    f.name = "part"
    return person.client.post(f"/v1/uploads/{upload_id}/parts", {"data": f}, format="multipart")


def chunks(content: bytes = CONTENT, n: int = 3) -> list[bytes]:
    size = len(content) // n + 1
    return [content[i : i + size] for i in range(0, len(content), size)]


def complete(person: Person, upload_id: str, part_ids: list[str], **extra: Any) -> Any:
    return person.client.post(
        f"/v1/uploads/{upload_id}/complete", {"part_ids": part_ids, **extra}, format="json"
    )


def test_parts_sent_out_of_order_assemble_in_the_order_given(
    alice: Person, django_capture_on_commit_callbacks: Any
) -> None:
    upload = start(alice, sha256=SHA)
    a, b, c = chunks()
    ids = {}
    for name, data in (("c", c), ("a", a), ("b", b)):  # arrival order differs
        ids[name] = send_part(alice, upload["id"], data).json()["id"]

    with django_capture_on_commit_callbacks(execute=True):
        done = complete(alice, upload["id"], [ids["a"], ids["b"], ids["c"]])

    assert done.status_code == 200, done.content
    body = done.json()
    assert body["status"] == "completed"
    assert body["file"]["bytes"] == len(CONTENT)
    assert body["file"]["sha256"] == SHA
    assert alice.client.get(f"/v1/files/{body['file']['id']}/content").getvalue() == CONTENT
    assert alice.client.get(f"/v1/files/{body['file']['id']}").json()["status"] == "processed"


def test_a_part_resent_after_a_dropped_connection_is_simply_not_used(alice: Person) -> None:
    upload = start(alice)
    a, b, c = chunks()
    first_a = send_part(alice, upload["id"], a).json()["id"]
    again_a = send_part(alice, upload["id"], a).json()["id"]  # the client retried
    rest = [send_part(alice, upload["id"], p).json()["id"] for p in (b, c)]

    state = alice.client.get(f"/v1/uploads/{upload['id']}").json()
    assert len(state["parts"]) == 4  # the resume view shows what arrived

    done = complete(alice, upload["id"], [again_a, *rest], md5=hashlib.md5(CONTENT).hexdigest())
    assert done.status_code == 200, done.content
    assert first_a not in str(done.json())


def test_listing_a_part_twice_is_400(alice: Person) -> None:
    upload = start(alice)
    ids = [send_part(alice, upload["id"], p).json()["id"] for p in chunks()]
    response = complete(alice, upload["id"], [ids[0], *ids])
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "duplicate_part"


def test_checksum_mismatch_is_400_and_leaves_no_file(alice: Person) -> None:
    upload = start(alice, sha256="0" * 64)
    ids = [send_part(alice, upload["id"], p).json()["id"] for p in chunks()]

    response = complete(alice, upload["id"], ids)

    assert response.status_code == 400
    assert response.json()["error"]["code"] == "checksum_mismatch"
    assert File.objects.for_organization(alice.organization).count() == 0
    # The upload is still pending: the client can fix the parts and complete again.
    assert alice.client.get(f"/v1/uploads/{upload['id']}").json()["status"] == "pending"


def test_wrong_md5_at_completion_is_400(alice: Person) -> None:
    upload = start(alice)
    ids = [send_part(alice, upload["id"], p).json()["id"] for p in chunks()]
    response = complete(alice, upload["id"], ids, md5="0" * 32)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "md5"


def test_parts_in_the_wrong_order_fail_the_checksum(alice: Person) -> None:
    upload = start(alice, sha256=SHA)
    ids = [send_part(alice, upload["id"], p).json()["id"] for p in chunks()]
    assert complete(alice, upload["id"], list(reversed(ids))).status_code == 400


def test_missing_parts_are_a_size_mismatch(alice: Person) -> None:
    upload = start(alice)
    ids = [send_part(alice, upload["id"], p).json()["id"] for p in chunks()]
    response = complete(alice, upload["id"], ids[:2])
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "size_mismatch"


def test_unknown_or_other_uploads_part_ids_are_400(alice: Person) -> None:
    one, other = start(alice), start(alice)
    theirs = send_part(alice, other["id"], b"abc").json()["id"]
    response = complete(alice, one["id"], [theirs, "part_nope"])
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "unknown_part"


def test_completed_and_cancelled_uploads_take_no_more_parts(alice: Person) -> None:
    upload = start(alice, content=b"abc")
    part = send_part(alice, upload["id"], b"abc").json()["id"]
    assert complete(alice, upload["id"], [part]).status_code == 200
    assert send_part(alice, upload["id"], b"more").status_code == 409
    assert complete(alice, upload["id"], [part]).status_code == 409

    cancelled = start(alice)
    assert alice.client.post(f"/v1/uploads/{cancelled['id']}/cancel").json()["status"] == (
        "cancelled"
    )
    assert send_part(alice, cancelled["id"], b"x").status_code == 409


def test_an_expired_upload_is_409(alice: Person) -> None:
    upload = start(alice)
    Upload.objects.for_organization(alice.organization).filter(pk=upload["id"]).update(
        expires_at=timezone.now() - timedelta(seconds=1)
    )
    response = send_part(alice, upload["id"], b"x")
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "upload_expired"


def test_an_oversized_part_is_413(alice: Person, settings: Any) -> None:
    settings.UPLOAD_PART_MAX_BYTES = 10
    upload = start(alice)
    assert send_part(alice, upload["id"], b"x" * 11).status_code == 413


def test_declaring_more_than_the_quota_is_403(alice: Person, settings: Any) -> None:
    settings.ORG_STORAGE_QUOTA_BYTES = 1000
    response = alice.client.post(
        "/v1/uploads",
        {"filename": "x.jsonl", "purpose": "fine-tune", "bytes": 1001},
        format="json",
    )
    assert response.status_code == 403


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"filename": "x.jsonl", "purpose": "fine-tune", "bytes": 0}, "bytes"),
        ({"filename": "x.jsonl", "purpose": "nope", "bytes": 1}, "purpose"),
        ({"filename": "../x", "purpose": "fine-tune", "bytes": 1}, "filename"),
        ({"filename": "x.jsonl", "purpose": "fine-tune", "bytes": 1, "sha256": "xyz"}, "sha256"),
        (
            {"filename": "x.jsonl", "purpose": "fine-tune", "bytes": 1, "organization": "o"},
            "organization",
        ),
    ],
)
def test_malformed_upload_creation_is_400(alice: Person, body: dict[str, Any], param: str) -> None:
    response = alice.client.post("/v1/uploads", body, format="json")
    assert response.status_code == 400, response.content
    assert response.json()["error"]["param"] == param


# --- expiry: quota, reading, the beat reaper --------------------------------------------------


def expire(person: Person, upload_id: str) -> None:
    Upload.objects.for_organization(person.organization).filter(pk=upload_id).update(
        expires_at=timezone.now() - timedelta(seconds=1)
    )


def part_names(person: Person, upload_id: str) -> list[str]:
    parts = UploadPart.objects.for_organization(person.organization).filter(upload_id=upload_id)
    return list(parts.values_list("storage_name", flat=True))


def test_an_expired_upload_stops_counting_against_the_quota(alice: Person, settings: Any) -> None:
    settings.ORG_STORAGE_QUOTA_BYTES = 1000
    stale = start(alice, content=b"x" * 800)
    body = {"filename": "next.jsonl", "purpose": "fine-tune", "bytes": 300}
    assert alice.client.post("/v1/uploads", body, format="json").status_code == 403

    expire(alice, stale["id"])  # the deadline passed; the reaper has not run yet

    response = alice.client.post("/v1/uploads", body, format="json")
    assert response.status_code == 200, response.content


def test_an_upload_reads_as_expired_once_its_deadline_passes(alice: Person) -> None:
    upload = start(alice)
    expire(alice, upload["id"])
    assert alice.client.get(f"/v1/uploads/{upload['id']}").json()["status"] == "expired"


def test_the_beat_task_expires_due_uploads_and_deletes_their_parts(alice: Person) -> None:
    stale, live = start(alice), start(alice)
    for upload in (stale, live):
        for data in chunks():
            assert send_part(alice, upload["id"], data).status_code == 200
    stale_names, live_names = part_names(alice, stale["id"]), part_names(alice, live["id"])
    assert all(default_storage.exists(name) for name in stale_names + live_names)
    expire(alice, stale["id"])

    assert expire_uploads() == 1

    state = alice.client.get(f"/v1/uploads/{stale['id']}").json()
    assert state["status"] == "expired"
    assert state["parts"] == []
    assert Upload.objects.for_organization(alice.organization).get(pk=stale["id"]).status == (
        "expired"
    )
    assert not any(default_storage.exists(name) for name in stale_names)
    # The live upload is untouched: pending, its parts stored, and it can still complete.
    assert alice.client.get(f"/v1/uploads/{live['id']}").json()["status"] == "pending"
    assert all(default_storage.exists(name) for name in live_names)
    assert len(part_names(alice, live["id"])) == 3

    assert expire_uploads() == 0  # the second run finds nothing to do
    ids = [p["id"] for p in alice.client.get(f"/v1/uploads/{live['id']}").json()["parts"]]
    assert complete(alice, live["id"], ids).status_code == 200


def test_the_reaper_expires_every_organizations_uploads_in_batches(
    alice: Person, charlie: Person
) -> None:
    ids = [start(alice)["id"] for _ in range(3)] + [start(charlie)["id"]]
    for person, upload_id in zip([alice] * 3 + [charlie], ids, strict=True):
        expire(person, upload_id)

    assert upload_expire_due(batch_size=2) == 4
    assert upload_expire_due(batch_size=2) == 0
    statuses = (
        Upload.objects.dangerously_unscoped().filter(pk__in=ids).values_list("status", flat=True)
    )
    assert set(statuses) == {"expired"}


def test_an_expired_upload_refuses_parts_and_completion_before_and_after_the_reaper(
    alice: Person,
) -> None:
    upload = start(alice, content=b"abc")
    part = send_part(alice, upload["id"], b"abc").json()["id"]
    expire(alice, upload["id"])
    for _ in ("before the reaper", "after the reaper"):
        for response in (
            send_part(alice, upload["id"], b"x"),
            complete(alice, upload["id"], [part]),
        ):
            assert response.status_code == 409
            assert response.json()["error"]["code"] == "upload_expired"
        upload_expire_due()
    assert File.objects.for_organization(alice.organization).count() == 0


def test_cancelling_an_expired_upload_is_409_and_discards_its_parts(alice: Person) -> None:
    upload = start(alice)
    send_part(alice, upload["id"], b"abc")
    names = part_names(alice, upload["id"])
    expire(alice, upload["id"])

    response = alice.client.post(f"/v1/uploads/{upload['id']}/cancel")

    assert response.status_code == 409
    assert response.json()["error"]["code"] == "upload_expired"
    assert not any(default_storage.exists(name) for name in names)
    assert alice.client.get(f"/v1/uploads/{upload['id']}").json()["status"] == "expired"
    assert upload_expire_due() == 0  # already done
    assert alice.client.post(f"/v1/uploads/{upload['id']}/cancel").status_code == 409


def test_outsider_gets_404_for_a_foreign_expired_upload(alice: Person, charlie: Person) -> None:
    upload = start(alice)
    expire(alice, upload["id"])
    for state in ("expired", "reaped"):
        assert charlie.client.get(f"/v1/uploads/{upload['id']}").status_code == 404, state
        assert charlie.client.post(f"/v1/uploads/{upload['id']}/cancel").status_code == 404
        upload_expire_due()


def test_the_beat_schedule_runs_the_registered_expire_task(settings: Any) -> None:
    entry = settings.CELERY_BEAT_SCHEDULE["datasets-expire-uploads"]
    assert entry["task"] == expire_uploads.name
    assert expire_uploads.name in celery_app.tasks
    assert expire_uploads.queue == "control"
    assert 0 < entry["schedule"] <= 300


@pytest.mark.django_db(transaction=True)
def test_a_concurrent_run_skips_an_upload_another_run_holds(alice: Person) -> None:
    held, other = start(alice), start(alice)
    expire(alice, held["id"])
    expire(alice, other["id"])
    locked, release = threading.Event(), threading.Event()

    def hold() -> None:
        try:
            with transaction.atomic():
                Upload.objects.for_organization(alice.organization).select_for_update().get(
                    pk=held["id"]
                )
                locked.set()
                release.wait(timeout=10)
        finally:
            connection.close()

    thread = threading.Thread(target=hold)
    thread.start()
    try:
        assert locked.wait(timeout=10)
        started = time.monotonic()
        assert upload_expire_due() == 1  # `other`, without waiting for `held`'s lock
        assert time.monotonic() - started < 5
    finally:
        release.set()
        thread.join()
    assert upload_expire_due() == 1  # `held`, once free
    assert upload_expire_due() == 0
