"""Pre-job reports of training files for a base model (`POST /v1/files/{id}/validate`).

What a report adds to the file's validation report: token counts for the base
model's tokenizer (`tokens.count_dataset_tokens`), exact and near-duplicate
counts (the datasets app's `preprocess_stream`, run with de-duplication only,
its output discarded) and, in the API, the price of N epochs.

Counting a multi-GB file takes minutes, which no web request should hold.
Files up to `FILE_ESTIMATE_SYNC_MAX_BYTES` are computed in the request; larger
ones by the task `controlplane.modelregistry.estimate_file` on the `control`
queue, and the endpoint answers 202 `in_progress` until the result is there.
Either way the result is kept (a `FileEstimate` per file, base model and
sequence limit), so asking again, for any number of epochs, is a lookup.
"""

from __future__ import annotations

import os
from datetime import datetime, timedelta
from typing import Any, Final

import structlog
from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import QuerySet
from django.utils import timezone

from controlplane.core.errors import ApiError, Conflict
from controlplane.datasets import storage
from controlplane.datasets.models import File, FileStatus
from controlplane.datasets.preprocess import Recipe, preprocess_stream
from controlplane.tenancy.models import Organization

from . import tokens
from .models import BaseModel, EstimateStatus, FileEstimate

log = structlog.get_logger(__name__)

#: Purposes whose files are validated as training data.
TRAINING_PURPOSES: Final = ("fine-tune", "distillation")


def file_estimate_check(file: File) -> str:
    """The file's format, or the 400/409 that says why it cannot be estimated (yet)."""
    if file.purpose not in TRAINING_PURPOSES:
        raise ApiError(
            f"This file's purpose is '{file.purpose}'; only training files "
            f"({', '.join(TRAINING_PURPOSES)}) can be estimated.",
            param="file_id",
            code="invalid_file_purpose",
        )
    if file.status in (FileStatus.UPLOADED, FileStatus.PROCESSING):
        raise Conflict(
            f"The file is still being validated (status '{file.status}'). "
            "Retry when its status is 'processed'.",
            code="file_not_ready",
        )
    if file.status == FileStatus.ERROR:
        details = f": {file.status_details}" if file.status_details else ""
        raise Conflict(
            f"The file failed validation{details}. Fix it and upload it again.",
            code="file_invalid",
        )
    format = (file.validation or {}).get("format")
    if not isinstance(format, str):
        raise Conflict("The file has no validation report; upload it again.", code="file_invalid")
    return format


def _estimates(
    organization: Organization | str, file: File, base: BaseModel
) -> QuerySet[FileEstimate]:
    return FileEstimate.objects.for_organization(organization).filter(file=file, base=base)


def file_estimate_request(
    *, organization: Organization, file: File, base: BaseModel, max_seq_len: int | None
) -> FileEstimate:
    """The file's report for `base` and `max_seq_len`: kept, computed now, or queued.

    Computed in the request for files up to FILE_ESTIMATE_SYNC_MAX_BYTES, else
    sent to the `control` queue after commit (the returned row is then
    `in_progress`). A failed computation is returned as such, and retried by a
    request made FILE_ESTIMATE_RETRY_SECONDS after it failed; one in progress for
    longer than FILE_ESTIMATE_STALE_SECONDS (a worker died; 5 minutes for a file
    counted in the request) is started again.
    """
    file_estimate_check(file)
    now = timezone.now()
    with transaction.atomic():
        estimate = _estimates(organization, file, base).filter(max_seq_len=max_seq_len)
        found = estimate.select_for_update().first()
        if found is None:
            try:
                with transaction.atomic():
                    found = FileEstimate.objects.create(
                        organization=organization,
                        file=file,
                        base=base,
                        max_seq_len=max_seq_len,
                        started_at=now,
                    )
            except IntegrityError:  # made by a concurrent request: use theirs
                return estimate.get()
        elif not _due(found, now, sync=file.bytes <= settings.FILE_ESTIMATE_SYNC_MAX_BYTES):
            return found
        else:
            found.status = EstimateStatus.IN_PROGRESS
            found.started_at, found.finished_at, found.error = now, None, ""
            found.save(update_fields=["status", "started_at", "finished_at", "error"])
        sync = file.bytes <= settings.FILE_ESTIMATE_SYNC_MAX_BYTES
        if not sync:
            from .tasks import estimate_file

            estimate_id, organization_id = found.pk, organization.pk
            transaction.on_commit(lambda: estimate_file.delay(estimate_id, organization_id))
    if sync:
        return file_estimate_compute(estimate_id=found.pk, organization_id=organization.pk)
    return found


#: A small file's count runs in a request, which never lasts this long: a row left
#: in progress for longer belongs to a web process that died mid-request.
_SYNC_STALE_SECONDS: Final = 300


def _due(estimate: FileEstimate, now: datetime, *, sync: bool) -> bool:
    """Whether a kept estimate should be computed again."""
    if estimate.status == EstimateStatus.FAILED:
        retry = timedelta(seconds=settings.FILE_ESTIMATE_RETRY_SECONDS)
        return estimate.finished_at is None or estimate.finished_at <= now - retry
    if estimate.status == EstimateStatus.IN_PROGRESS:
        stale = _SYNC_STALE_SECONDS if sync else settings.FILE_ESTIMATE_STALE_SECONDS
        return estimate.started_at <= now - timedelta(seconds=stale)
    return False


def file_estimate_compute(*, estimate_id: str, organization_id: str) -> FileEstimate:
    """Count tokens and duplicates and keep the result; safe to run twice (a done one is kept)."""
    estimates = FileEstimate.objects.for_organization(organization_id)
    estimate = estimates.select_related("file", "base").get(pk=estimate_id)
    if estimate.status == EstimateStatus.COMPLETED:
        return estimate
    file, base = estimate.file, estimate.base
    started = timezone.now()
    try:
        if file.deleted_at is not None:
            raise ApiError("The file was deleted.", code="file_deleted")
        format = file_estimate_check(file)
        stats = tokens.count_dataset_tokens(
            base=base,
            storage_name=file.storage_name,
            format=format,
            max_seq_len=estimate.max_seq_len,
            max_line_bytes=settings.VALIDATION_MAX_LINE_BYTES,
        )
        result = {"tokens": stats.to_dict(), "duplicates": _duplicates(organization_id, file)}
        changes: dict[str, Any] = {"status": EstimateStatus.COMPLETED, "result": result}
        log.info(
            "modelregistry.file_estimated",
            file_id=file.pk,
            model_id=base.pk,
            tokens=stats.total_tokens,
            seconds=round((timezone.now() - started).total_seconds(), 3),
        )
    except ApiError as exc:  # the file went away or changed state meanwhile
        changes = {"status": EstimateStatus.FAILED, "error": str(exc.detail)}
    except Exception as exc:
        log.exception("modelregistry.file_estimate_failed", file_id=file.pk, model_id=base.pk)
        changes = {
            "status": EstimateStatus.FAILED,
            "error": f"Counting tokens failed ({type(exc).__name__}). Retry later; if it "
            "persists, quote this file id to support.",
        }
    estimates.filter(pk=estimate_id).update(finished_at=timezone.now(), **changes)
    estimate.refresh_from_db()
    return estimate


def _duplicates(organization_id: str, file: File) -> dict[str, Any]:
    """Exact and near-duplicate rows, as a dataset version's de-duplication would count them.

    Rows are compared as they are (no normalisation); near-duplicates are
    counted among rows that are not exact duplicates. Model-independent, so
    taken from another completed estimate of the same file when there is one.
    """
    done = (
        FileEstimate.objects.for_organization(organization_id)
        .filter(file=file, status=EstimateStatus.COMPLETED, result__has_key="duplicates")
        .values_list("result", flat=True)
        .first()
    )
    if done:
        return dict(done["duplicates"])
    recipe = Recipe(normalize=False, drop_empty=False, dedupe_exact=True, dedupe_near=True)
    format = (file.validation or {})["format"]
    with storage.open_object(file.storage_name) as src, open(os.devnull, "wb") as sink:
        report = preprocess_stream(
            src,
            sink,
            format=format,
            recipe=recipe,
            max_line_bytes=settings.VALIDATION_MAX_LINE_BYTES,
        )
    return {
        "exact": report.removed["exact_duplicate"],
        "near": report.removed["near_duplicate"],
        "near_threshold": recipe.near_threshold,
    }
