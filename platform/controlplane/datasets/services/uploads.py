"""Resumable uploads: parts in any order, assembled and checksum-verified on completion."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import IO

import structlog
from django.conf import settings
from django.db import transaction
from django.utils import timezone

from controlplane.core.errors import ApiError, Conflict
from controlplane.tenancy.models import Organization

from .. import storage
from ..models import (
    File,
    Upload,
    UploadPart,
    UploadStatus,
)
from .files import filename_check, purpose_check, quota_reserve, schedule_validation, size_check

log = structlog.get_logger(__name__)

# --- uploads ----------------------------------------------------------------------------------


@transaction.atomic
def upload_create(
    *,
    organization: Organization,
    user_id: str | None,
    filename: str,
    purpose: str,
    nbytes: int,
    mime_type: str,
    sha256: str,
) -> Upload:
    filename = filename_check(filename)
    purpose = purpose_check(purpose)
    size_check(nbytes, settings.UPLOAD_MAX_BYTES, what="Upload", param="bytes")
    quota_reserve(organization=organization, nbytes=nbytes)
    return Upload.objects.create(
        organization=organization,
        filename=filename,
        purpose=purpose,
        bytes=nbytes,
        mime_type=mime_type,
        sha256=sha256.lower(),
        created_by_id=user_id,
        expires_at=timezone.now() + timedelta(seconds=settings.UPLOAD_TTL_SECONDS),
    )


def _require_pending(upload: Upload) -> None:
    if upload.status == UploadStatus.PENDING and upload.expires_at <= timezone.now():
        raise Conflict("This upload has expired; start a new one.", code="upload_expired")
    if upload.status != UploadStatus.PENDING:
        raise Conflict(
            f"This upload is {upload.status}; parts can no longer be added or completed.",
            code=f"upload_{upload.status}",
        )


def upload_add_part(*, upload: Upload, source: IO[bytes], size: int) -> UploadPart:
    """Store one part. Parts may arrive in any order, and a part may be re-sent after a
    dropped connection: the order is given at completion, by part ids."""
    _require_pending(upload)
    size_check(size, settings.UPLOAD_PART_MAX_BYTES, what="Part", param="data")
    part = UploadPart(organization_id=upload.organization_id, upload=upload)
    name, nbytes, sha256 = storage.save_stream(
        f"uploads/{upload.organization_id}/{upload.pk}/{part.pk}",
        source,
        limit=settings.UPLOAD_PART_MAX_BYTES,
    )
    try:
        with transaction.atomic():
            locked = Upload.objects.locked(upload)
            _require_pending(locked)
            if nbytes == 0:
                raise ApiError("A part cannot be empty.", param="data", code="empty_part")
            part.storage_name, part.bytes, part.sha256 = name, nbytes, sha256
            part.save(force_insert=True)
    except BaseException:
        storage.delete_quietly(name)
        raise
    return part


def upload_complete(
    *, upload: Upload, part_ids: list[str], md5: str | None, sha256: str | None
) -> Upload:
    """Assemble the parts in the given order into one file, verify size and checksum."""
    _require_pending(upload)
    if len(set(part_ids)) != len(part_ids):
        raise ApiError(
            "'part_ids' lists a part more than once.", param="part_ids", code="duplicate_part"
        )
    parts = {p.pk: p for p in upload.parts.filter(pk__in=part_ids)}
    missing = [p for p in part_ids if p not in parts]
    if missing:
        raise ApiError(
            f"Unknown part id(s) for this upload: {', '.join(missing[:5])}.",
            param="part_ids",
            code="unknown_part",
        )
    ordered = [parts[p] for p in part_ids]
    total = sum(p.bytes for p in ordered)
    if total != upload.bytes:
        raise ApiError(
            f"The parts hold {total} bytes but the upload declared {upload.bytes}.",
            param="part_ids",
            code="size_mismatch",
        )
    expected_sha = (sha256 or upload.sha256 or "").lower()
    file = File(
        organization_id=upload.organization_id,
        filename=upload.filename,
        purpose=upload.purpose,
        created_by_id=upload.created_by_id,
    )
    source = storage.ConcatReader(p.storage_name for p in ordered)
    name, nbytes, digest = storage.save_stream(f"files/{upload.organization_id}/{file.pk}", source)
    source.close()
    try:
        if expected_sha and digest != expected_sha:
            raise ApiError(
                f"Checksum mismatch: the assembled file's sha256 is {digest}, not "
                f"{expected_sha}. Re-send the damaged parts and complete again.",
                param="sha256",
                code="checksum_mismatch",
            )
        if md5 and source.md5.hexdigest() != md5.lower():
            raise ApiError(
                f"Checksum mismatch: the assembled file's md5 is "
                f"{source.md5.hexdigest()}, not {md5.lower()}.",
                param="md5",
                code="checksum_mismatch",
            )
        with transaction.atomic():
            locked = Upload.objects.locked(upload)
            _require_pending(locked)
            file.storage_name, file.bytes, file.sha256 = name, nbytes, digest
            file.save(force_insert=True)
            locked.status = UploadStatus.COMPLETED
            locked.file = file
            locked.save(update_fields=["status", "file"])
            part_names = [p.storage_name for p in locked.parts.all()]
            schedule_validation(file)
            transaction.on_commit(lambda: _delete_all(part_names))
    except BaseException:
        storage.delete_quietly(name)
        raise
    return locked


def _delete_all(names: list[str]) -> None:
    for name in names:
        storage.delete_quietly(name)


def upload_cancel(*, upload: Upload) -> Upload:
    """Cancel a pending upload and delete its parts.

    An upload past its deadline is not cancelled but expired (409 `upload_expired`):
    it is discarded with its parts right here, as the reaper would, so the answer is
    true the moment it is given.
    """
    with transaction.atomic():
        upload = Upload.objects.locked(upload)
        if not upload.is_expired():
            _require_pending(upload)
            upload.status = UploadStatus.CANCELLED
            upload.save(update_fields=["status"])
            names = [p.storage_name for p in upload.parts.all()]
            transaction.on_commit(lambda: _delete_all(names))
            return upload
        if upload.status == UploadStatus.PENDING:
            _expire_locked([upload])
    raise Conflict(
        f"This upload expired at {upload.expires_at.isoformat()} and cannot be cancelled: "
        "its parts are deleted and it no longer counts against your storage quota. "
        "Start a new upload to send the file.",
        code="upload_expired",
    )


# --- expiry -----------------------------------------------------------------------------------


def upload_expire_due(*, now: datetime | None = None, batch_size: int = 200) -> int:
    """Expire every pending upload past its `expires_at`; returns how many were expired.

    Run by beat (task `controlplane.datasets.expire_uploads`), across all
    organizations on purpose. Each upload gets status `expired`, its part objects
    are deleted from storage and its part rows removed. (Quota stopped counting it
    at `expires_at` already; see `files._stored_bytes`.)

    Safe to run twice and concurrently: each batch locks its rows with
    SKIP LOCKED, so concurrent runs split the work instead of waiting, and an
    upload being written to (add part, complete, cancel hold its row lock) is
    left for the next run. Objects are deleted before the rows naming them, inside
    the locked transaction: a failed run leaves the upload pending, to be retried,
    never an object no row points at.
    """
    now = now or timezone.now()
    expired = 0
    failed: set[str] = set()
    while True:
        with transaction.atomic():
            batch = list(
                Upload.objects.dangerously_unscoped()
                .select_for_update(skip_locked=True)
                .filter(status=UploadStatus.PENDING, expires_at__lte=now)
                .exclude(pk__in=failed)
                .order_by("expires_at", "pk")[:batch_size]
            )
            done = _expire_locked(batch)
        expired += len(done)
        failed.update(u.pk for u in batch if u.pk not in done)
        if len(batch) < batch_size:
            break
    if expired or failed:
        log.info("datasets.uploads_expired", expired=expired, failed=len(failed))
    return expired


def _expire_locked(uploads: list[Upload]) -> set[str]:
    """Expire `uploads` (rows locked by the caller); returns the ids that were expired."""
    names: dict[str, list[str]] = {u.pk: [] for u in uploads}
    parts = UploadPart.objects.dangerously_unscoped().filter(upload_id__in=list(names))
    for upload_id, name in parts.values_list("upload_id", "storage_name"):
        names[upload_id].append(name)
    done: set[str] = set()
    for upload in uploads:
        try:
            for name in names[upload.pk]:
                storage.delete(name)
        except Exception:
            # Left pending (quota ignores it already); the next run tries again.
            log.exception(
                "datasets.upload_expire_failed",
                upload_id=upload.pk,
                organization_id=upload.organization_id,
            )
            continue
        done.add(upload.pk)
    if done:
        UploadPart.objects.dangerously_unscoped().filter(upload_id__in=done).delete()
        Upload.objects.dangerously_unscoped().filter(
            pk__in=done, status=UploadStatus.PENDING
        ).update(status=UploadStatus.EXPIRED)
        for upload in uploads:
            if upload.pk in done:
                upload.status = UploadStatus.EXPIRED
    return done
