"""Writes for files and uploads. Storage is written first and removed again on any failure,
so an error never leaves a row without its object or an object without its row."""

from __future__ import annotations

import io
import re
import tempfile
from datetime import timedelta
from typing import IO

import structlog
from django.conf import settings
from django.db import transaction
from django.db.models import Max, Sum
from django.utils import timezone

from controlplane.core.errors import ApiError, Conflict, NotFound
from controlplane.tenancy.models import Organization

from . import storage
from .models import (
    PURPOSES,
    Dataset,
    DatasetVersion,
    File,
    FileStatus,
    Upload,
    UploadPart,
    UploadStatus,
    VersionStatus,
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


def purpose_check(purpose: str) -> str:
    if purpose not in PURPOSES:
        raise ApiError(
            f"'purpose' must be one of {', '.join(PURPOSES)}.",
            param="purpose",
            code="invalid_purpose",
        )
    return purpose


def _stored_bytes(organization: Organization) -> int:
    files = File.objects.for_organization(organization).filter(deleted_at__isnull=True)
    pending = Upload.objects.for_organization(organization).filter(status=UploadStatus.PENDING)
    return (files.aggregate(n=Sum("bytes"))["n"] or 0) + (
        pending.aggregate(n=Sum("bytes"))["n"] or 0
    )


def quota_reserve(*, organization: Organization, nbytes: int) -> None:
    """Refuse (403) what would take the organization over its storage quota.

    Locks the organization's row, so concurrent uploads are checked one at a time;
    call inside the transaction that records the new bytes.
    """
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


def _schedule_validation(file: File) -> None:
    from .tasks import validate_file

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
            _schedule_validation(file)
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
            _schedule_validation(file)
            transaction.on_commit(lambda: _delete_all(part_names))
    except BaseException:
        storage.delete_quietly(name)
        raise
    return locked


def _delete_all(names: list[str]) -> None:
    for name in names:
        storage.delete_quietly(name)


@transaction.atomic
def upload_cancel(*, upload: Upload) -> Upload:
    upload = Upload.objects.locked(upload)
    _require_pending(upload)
    upload.status = UploadStatus.CANCELLED
    upload.save(update_fields=["status"])
    names = [p.storage_name for p in upload.parts.all()]
    transaction.on_commit(lambda: _delete_all(names))
    return upload


# --- validation -------------------------------------------------------------------------------


def file_validate(*, file_id: str, organization_id: str) -> File:
    """Validate a stored file, streaming; idempotent (a finished file is left as it is)."""
    from . import validation

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


# --- datasets and versions -------------------------------------------------------------------


def dataset_create(*, organization: Organization, name: str, description: str) -> Dataset:
    return Dataset.objects.create(organization=organization, name=name, description=description)


@transaction.atomic
def version_create(
    *, dataset: Dataset, file_ids: list[str], recipe: dict[str, object]
) -> DatasetVersion:
    """Start building a new immutable version from processed files and a recipe."""
    from .preprocess import Recipe

    try:
        parsed = Recipe.from_dict(recipe)
    except ValueError as exc:
        raise ApiError(f"Invalid recipe: {exc}", param="recipe", code="invalid_recipe") from None
    if len(set(file_ids)) != len(file_ids):
        raise ApiError("A file is listed more than once.", param="file_ids")
    files = {
        f.pk: f
        for f in File.objects.for_organization(dataset.organization_id).filter(
            pk__in=file_ids, deleted_at__isnull=True
        )
    }
    missing = [i for i in file_ids if i not in files]
    if missing:
        raise NotFound(f"No file with id '{missing[0]}' found.", param="file_ids")
    ordered = [files[i] for i in file_ids]
    not_ready = [f.pk for f in ordered if f.status != FileStatus.PROCESSED or not f.validation]
    if not_ready:
        raise Conflict(
            f"File '{not_ready[0]}' has not passed validation (status must be "
            "'processed'); fix it and upload it again.",
            param="file_ids",
            code="file_not_processed",
        )
    formats = {str((f.validation or {}).get("format")) for f in ordered}
    if len(formats) != 1:
        raise ApiError(
            f"All files of a version must have one format; got {sorted(formats)}.",
            param="file_ids",
            code="mixed_formats",
        )
    fmt = formats.pop()
    if fmt == "csv" and len(ordered) > 1:
        raise ApiError(
            "A CSV version is built from one file (headers would repeat).",
            param="file_ids",
            code="mixed_formats",
        )
    Dataset.objects.locked(dataset)  # serialise numbering
    number = (dataset.versions.aggregate(n=Max("number"))["n"] or 0) + 1
    version = DatasetVersion.objects.create(
        organization_id=dataset.organization_id,
        dataset=dataset,
        number=number,
        source_files=file_ids,
        recipe=parsed.to_dict(),
        format=fmt,
    )
    from .tasks import build_version

    transaction.on_commit(lambda: build_version.delay(version.pk, version.organization_id))
    return version


def version_build(*, version_id: str, organization_id: str) -> DatasetVersion:
    """Concatenate the source files, preprocess them streaming, store the result."""
    from .preprocess import Recipe, preprocess_stream

    version = DatasetVersion.objects.for_organization(organization_id).get(pk=version_id)
    if version.status != VersionStatus.PROCESSING:
        return version  # idempotent: a finished version is never rebuilt
    files = File.objects.for_organization(organization_id).in_bulk(version.source_files)
    names = [files[i].storage_name for i in version.source_files]
    name = f"datasets/{organization_id}/{version.dataset_id}/{version.pk}"
    try:
        with tempfile.TemporaryFile() as out:
            source = storage.ConcatReader(names, line_separated=version.format != "csv")
            report = preprocess_stream(
                io.BufferedReader(source, storage.CHUNK),
                out,
                format=version.format,
                recipe=Recipe.from_dict(version.recipe),
            )
            out.seek(0)
            stored, nbytes, sha256 = storage.save_stream(name, out)
    except Exception as exc:
        log.exception("datasets.version_build_failed", version_id=version_id)
        DatasetVersion.objects.for_organization(organization_id).filter(pk=version_id).update(
            status=VersionStatus.ERROR, status_details=f"{type(exc).__name__}: {exc}"[:1000]
        )
        version.refresh_from_db()
        return version
    DatasetVersion.objects.for_organization(organization_id).filter(pk=version_id).update(
        status=VersionStatus.READY,
        storage_name=stored,
        bytes=nbytes,
        sha256=sha256,
        rows=report.rows_out,
        report=report.to_dict(),
    )
    version.refresh_from_db()
    return version
