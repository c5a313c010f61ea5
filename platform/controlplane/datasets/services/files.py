"""Files: checks, quota, storing, deleting, and streaming validation.

Storage is written first and removed again on any failure, so an error never
leaves a row without its object or an object without its row.
"""

from __future__ import annotations

import re
from typing import IO

import structlog
from django.conf import settings
from django.db import transaction
from django.db.models import Sum
from django.utils import timezone

from controlplane.core.errors import ApiError
from controlplane.tenancy.models import Organization

from .. import storage
from ..models import (
    PURPOSES,
    UPLOAD_PURPOSES,
    File,
    FileStatus,
    Upload,
    UploadStatus,
)

log = structlog.get_logger(__name__)

_FORBIDDEN_IN_NAMES = re.compile(r"[\x00-\x1f\x7f/\\]")


def filename_check(filename: str) -> str:
    """The client's filename is metadata only, but it must be a plain, printable name."""
    if not filename or not filename.strip():
        raise ApiError("The file needs a name.", param="filename", code="invalid_filename")
    if len(filename) > 255:
        raise ApiError(
            "Filenames can be at most 255 characters.", param="filename", code="invalid_filename"
        )
    if _FORBIDDEN_IN_NAMES.search(filename) or filename in {".", ".."}:
        raise ApiError(
            "Filenames cannot contain path separators, NUL or control characters.",
            param="filename",
            code="invalid_filename",
        )
    return filename.strip()


def purpose_check(purpose: str, *, upload: bool = True) -> str:
    """`purpose` if a file may have it; with `upload`, if a client may upload one with it
    (a `batch_output` file is written by the platform only, as OpenAI's)."""
    allowed = UPLOAD_PURPOSES if upload else PURPOSES
    if purpose in PURPOSES and purpose not in allowed:
        raise ApiError(
            f"Files with purpose '{purpose}' are written by the platform (a batch's output "
            f"and error files) and cannot be uploaded; use one of {', '.join(allowed)}.",
            param="purpose",
            code="invalid_purpose",
        )
    if purpose not in allowed:
        raise ApiError(
            f"'purpose' must be one of {', '.join(allowed)}.",
            param="purpose",
            code="invalid_purpose",
        )
    return purpose


def _stored_bytes(organization: Organization) -> int:
    files = File.objects.for_organization(organization).filter(deleted_at__isnull=True)
    # An upload past its deadline can take no more parts and never completes: it stops
    # counting at `expires_at`, not when the reaper gets round to deleting its parts.
    pending = Upload.objects.for_organization(organization).filter(
        status=UploadStatus.PENDING, expires_at__gt=timezone.now()
    )
    return (files.aggregate(n=Sum("bytes"))["n"] or 0) + (
        pending.aggregate(n=Sum("bytes"))["n"] or 0
    )


def quota_reserve(*, organization: Organization, nbytes: int, lock: bool = True) -> None:
    """Refuse (403) what would take the organization over its storage quota.

    Locks the organization's row, so concurrent uploads are checked one at a time;
    call inside the transaction that records the new bytes. `lock=False` is the
    cheap early check made before any byte is stored.
    """
    if lock:
        Organization.objects.select_for_update().filter(pk=organization.pk).first()
    quota = settings.ORG_STORAGE_QUOTA_BYTES
    used = _stored_bytes(organization)
    if used + nbytes > quota:
        raise ApiError(
            f"Storage quota exceeded: this organization may store {quota} bytes and holds "
            f"{used}; this needs {nbytes} more. Delete files or ask for a larger quota.",
            status_code=403,
            code="storage_quota_exceeded",
        )


def size_check(nbytes: int, limit: int, *, what: str, param: str | None = None) -> None:
    if nbytes > limit:
        raise ApiError(
            f"{what} is {nbytes} bytes; the limit is {limit} bytes."
            + (" Send larger files with the uploads API (/v1/uploads)." if what == "File" else ""),
            status_code=413,
            param=param,
            code="file_too_large",
        )


def schedule_validation(file: File) -> None:
    from ..tasks import validate_file

    transaction.on_commit(lambda: validate_file.delay(file.pk, file.organization_id))


def file_create(
    *,
    organization: Organization,
    user_id: str | None,
    source: IO[bytes],
    size: int,
    filename: str,
    purpose: str,
) -> File:
    """Store an uploaded file and queue its validation."""
    filename = filename_check(filename)
    purpose = purpose_check(purpose)
    size_check(size, settings.FILE_UPLOAD_MAX_BYTES, what="File", param="file")
    if size == 0:
        raise ApiError("The file is empty.", param="file", code="empty_file")
    quota_reserve(organization=organization, nbytes=size, lock=False)  # before storing
    file = File(
        organization=organization, filename=filename, purpose=purpose, created_by_id=user_id
    )
    name, nbytes, sha256 = storage.save_stream(
        f"files/{organization.pk}/{file.pk}", source, limit=settings.FILE_UPLOAD_MAX_BYTES
    )
    try:
        with transaction.atomic():
            quota_reserve(organization=organization, nbytes=nbytes)
            file.storage_name, file.bytes, file.sha256 = name, nbytes, sha256
            file.save(force_insert=True)
            schedule_validation(file)
    except BaseException:
        storage.delete_quietly(name)
        raise
    log.info("datasets.file_created", file_id=file.pk, bytes=nbytes, purpose=purpose)
    return file


@transaction.atomic
def file_delete(*, file: File) -> None:
    file = File.objects.locked(file)
    if file.deleted_at is not None:
        return
    file.deleted_at = timezone.now()
    file.save(update_fields=["deleted_at"])
    name = file.storage_name
    transaction.on_commit(lambda: storage.delete_quietly(name))


# --- validation -------------------------------------------------------------------------------


def file_validate(*, file_id: str, organization_id: str) -> File:
    """Validate a stored file, streaming; idempotent (a finished file is left as it is)."""
    from .. import validation
    from ..requests_format import validate_requests_stream

    with transaction.atomic():
        file = File.objects.for_organization(organization_id).select_for_update().get(pk=file_id)
        if file.status in (FileStatus.PROCESSED, FileStatus.ERROR) or file.deleted_at:
            return file
        file.status = FileStatus.PROCESSING
        file.save(update_fields=["status"])
    try:
        if file.purpose == "user_data":
            report: dict[str, object] | None = None
            ok, details = True, ""
        else:
            with storage.open_object(file.storage_name) as stream:
                compressed = _compression(stream.read(4))
                stream.seek(0)
                if compressed:
                    raise _Refused(
                        f"This is a {compressed} archive. Compressed uploads are not accepted "
                        "(they can expand without bound): upload the uncompressed file."
                    )
                if file.purpose in ("batch", "evals"):
                    result = validate_requests_stream(
                        stream,
                        kind=file.purpose,
                        max_errors=settings.VALIDATION_MAX_ERRORS,
                        max_line_bytes=settings.VALIDATION_MAX_LINE_BYTES,
                    )
                else:  # training data: fine-tune, distillation
                    result = validation.validate_stream(
                        stream,
                        filename=file.filename,
                        max_errors=settings.VALIDATION_MAX_ERRORS,
                        max_line_bytes=settings.VALIDATION_MAX_LINE_BYTES,
                    )
            report, ok = result.to_dict(), result.ok()
            details = "" if ok else _summary(result)
    except _Refused as exc:
        report, ok, details = None, False, str(exc)
    except Exception as exc:
        log.exception("datasets.validation_crashed", file_id=file_id)
        report, ok, details = None, False, f"Validation failed: {type(exc).__name__}"
    File.objects.for_organization(organization_id).filter(pk=file_id).update(
        status=FileStatus.PROCESSED if ok else FileStatus.ERROR,
        status_details=details,
        validation=report,
    )
    file.refresh_from_db()
    return file


class _Refused(Exception):
    """A file refused outright, with the reason for the user."""


_MAGIC = {
    b"\x1f\x8b": "gzip",
    b"PK\x03\x04": "zip",
    b"BZh": "bzip2",
    b"\xfd7zX": "xz",
    b"(\xb5/\xfd": "zstd",
}


def _compression(head: bytes) -> str | None:
    return next((kind for magic, kind in _MAGIC.items() if head.startswith(magic)), None)


def _summary(result: object) -> str:
    errors = getattr(result, "errors", [])
    count = getattr(result, "error_count", 0)
    rows = getattr(result, "rows", 0)
    if not errors:
        return "The file has no valid rows." if rows == 0 else ""
    first = errors[0]
    where = f"line {first.line}" + (f", field '{first.field}'" if first.field else "")
    more = f" (and {count - 1} more errors)" if count > 1 else ""
    return f"{where}: {first.reason}{more}"
