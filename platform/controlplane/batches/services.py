"""Batches: create, cancel, and the state changes of a run (see `runner` for the run)."""

from __future__ import annotations

import io
from datetime import timedelta
from typing import Any

import orjson
import structlog
from django.db import transaction
from django.utils import timezone

from controlplane.core.errors import ApiError, Conflict
from controlplane.datasets import storage
from controlplane.datasets.models import File, FileStatus
from controlplane.datasets.requests_format import BATCH_URLS
from controlplane.tenancy.models import Organization

from .models import COMPLETION_WINDOWS, FINISHED, Batch, BatchLine, BatchStatus, LineStatus
from .signals import batch_finished

log = structlog.get_logger(__name__)

#: OpenAI's purpose for the files a batch writes.
OUTPUT_PURPOSE = "batch_output"


def _finished(batch_id: str, organization_id: str, status: str) -> None:
    batch_finished.send(
        sender=Batch, batch_id=batch_id, organization_id=organization_id, status=status
    )


def _schedule(batch: Batch) -> None:
    batch_schedule(batch_id=batch.pk, organization_id=batch.organization_id)


def batch_schedule(*, batch_id: str, organization_id: str) -> None:
    """Send the batch's runner task once the transaction commits (at once outside one)."""
    from .tasks import run_batch

    transaction.on_commit(lambda: run_batch.delay(batch_id, organization_id))


@transaction.atomic
def batch_create(
    *,
    organization: Organization,
    input_file: File,
    endpoint: str,
    completion_window: str,
    metadata: dict[str, str] | None,
    api_key_id: str | None,
    user_id: str | None,
) -> Batch:
    if endpoint not in BATCH_URLS:
        raise ApiError(
            f"'endpoint' must be one of {', '.join(BATCH_URLS)}.",
            param="endpoint",
            code="invalid_value",
        )
    if completion_window not in COMPLETION_WINDOWS:
        raise ApiError(
            "'completion_window' must be '24h'.", param="completion_window", code="invalid_value"
        )
    if input_file.purpose != "batch":
        raise ApiError(
            f"The file '{input_file.pk}' has purpose '{input_file.purpose}': upload the "
            "requests with purpose 'batch'.",
            param="input_file_id",
            code="invalid_file",
        )
    now = timezone.now()
    batch = Batch.objects.create(
        organization=organization,
        input_file=input_file,
        endpoint=endpoint,
        completion_window=completion_window,
        metadata=metadata,
        api_key_id=api_key_id,
        created_by_id=user_id,
        expires_at=now + timedelta(hours=24),
    )
    _schedule(batch)
    log.info("batches.created", batch_id=batch.pk, file_id=input_file.pk, endpoint=endpoint)
    return batch


@transaction.atomic
def batch_cancel(*, batch: Batch) -> Batch:
    """validating/in_progress → cancelling (the runner stops sending and ends it as
    cancelled); a finished batch cannot be cancelled (409)."""
    batch = Batch.objects.locked(batch)
    if batch.status in FINISHED or batch.status == BatchStatus.FINALIZING:
        raise Conflict(
            f"The batch '{batch.pk}' is {batch.status}: only a validating or in-progress "
            "batch can be cancelled.",
            code="batch_not_cancellable",
        )
    if batch.status != BatchStatus.CANCELLING:
        batch.status = BatchStatus.CANCELLING
        batch.cancelling_at = timezone.now()
        batch.save(update_fields=["status", "cancelling_at"])
        _schedule(batch)  # ends it at once when no runner holds it
    return batch


# --- the run's state changes ------------------------------------------------------------


def batch_fail(*, batch: Batch, code: str, message: str, line: int | None = None) -> None:
    failed = (
        Batch.objects.for_organization(batch.organization_id)
        .filter(pk=batch.pk, status=BatchStatus.VALIDATING)
        .update(
            status=BatchStatus.FAILED,
            failed_at=timezone.now(),
            errors={
                "object": "list",
                "data": [{"code": code, "message": message, "param": None, "line": line}],
            },
        )
    )
    log.info("batches.failed", batch_id=batch.pk, code=code)
    if failed:
        _finished(batch.pk, batch.organization_id, BatchStatus.FAILED)


def batch_expire_unstarted(*, batch_id: str, organization_id: str) -> bool:
    """validating → expired: a batch that could not start within its completion window
    (its input file never got validated; no line ran, so there is no file to write).
    Call holding the batch's runner lock, so no runner loads its lines meanwhile."""
    now = timezone.now()
    expired = (
        Batch.objects.for_organization(organization_id)
        .filter(pk=batch_id, status=BatchStatus.VALIDATING, expires_at__lte=now)
        .update(status=BatchStatus.EXPIRED, expired_at=now)
    )
    if expired:
        log.info("batches.expired_unstarted", batch_id=batch_id)
        _finished(batch_id, organization_id, BatchStatus.EXPIRED)
    return bool(expired)


def batch_load_lines(*, batch: Batch) -> bool:
    """validating → in_progress: one row per input line (or failed, with the reason)."""
    file = batch.input_file
    if file.deleted_at is not None:
        batch_fail(batch=batch, code="invalid_file", message="The input file was deleted.")
        return False
    if file.status in (FileStatus.UPLOADED, FileStatus.PROCESSING):
        return False  # validated by the Files API first: the task comes back later
    report = file.validation or {}
    if file.status == FileStatus.ERROR or report.get("error_count"):
        first = (report.get("errors") or [{}])[0]
        batch_fail(
            batch=batch,
            code="invalid_file",
            message=(
                f"The input file is not a valid batch file ({report.get('error_count')} bad "
                f"lines); line {first.get('line')}: '{first.get('field')}' "
                f"{first.get('reason') or file.status_details}."
            ),
            line=first.get("line"),
        )
        return False
    from django.conf import settings

    rows: list[BatchLine] = []
    with storage.open_object(file.storage_name) as stream:
        for raw in stream:
            if not raw.strip():
                continue
            item: dict[str, Any] = orjson.loads(raw)
            rows.append(
                BatchLine(
                    batch=batch,
                    index=len(rows),
                    custom_id=item["custom_id"],
                    url=str(item["url"]),
                    body=item["body"],
                )
            )
    if len(rows) > settings.BATCH_MAX_LINES:
        batch_fail(
            batch=batch,
            code="too_many_requests",
            message=f"A batch holds at most {settings.BATCH_MAX_LINES} requests; "
            f"this file has {len(rows)}.",
        )
        return False
    with transaction.atomic():
        locked = Batch.objects.locked(batch)
        if locked.status != BatchStatus.VALIDATING:
            return False
        BatchLine.objects.bulk_create(rows, batch_size=2000)
        locked.status = BatchStatus.IN_PROGRESS
        locked.in_progress_at = timezone.now()
        locked.total = len(rows)
        locked.save(update_fields=["status", "in_progress_at", "total"])
    log.info("batches.in_progress", batch_id=batch.pk, lines=len(rows))
    return True


def counts_refresh(batch: Batch) -> None:
    lines = BatchLine.objects.filter(batch=batch)
    Batch.objects.for_organization(batch.organization_id).filter(pk=batch.pk).update(
        completed=lines.filter(status=LineStatus.SUCCEEDED).count(),
        failed=lines.filter(status=LineStatus.FAILED).count(),
    )


def _line_id(line: BatchLine) -> str:
    return f"batch_req_{line.batch_id.removeprefix('batch_')}_{line.index}"


def _write_file(batch: Batch, kind: str, chunks: list[bytes]) -> File | None:
    if not chunks:
        return None
    file = File(
        organization_id=batch.organization_id,
        filename=f"{batch.pk}_{kind}.jsonl",
        purpose=OUTPUT_PURPOSE,
        status=FileStatus.PROCESSED,
    )
    name, nbytes, sha256 = storage.save_stream(
        f"files/{batch.organization_id}/{file.pk}", io.BytesIO(b"".join(chunks))
    )
    file.storage_name, file.bytes, file.sha256 = name, nbytes, sha256
    file.save(force_insert=True)
    return file


_NOT_RUN = {
    BatchStatus.EXPIRED: (
        "batch_expired",
        "This request could not be executed before the completion window expired.",
    ),
    BatchStatus.CANCELLED: (
        "batch_cancelled",
        "This request was not executed: the batch was cancelled.",
    ),
}


def batch_finalize(*, batch: Batch, ending: str) -> None:
    """Write the output and error files from the lines (in input order) and end the batch
    as `ending`. Lines that never ran get an error line when the batch expired
    (`batch_expired`) or was cancelled (`batch_cancelled`)."""
    now = timezone.now()
    Batch.objects.for_organization(batch.organization_id).filter(pk=batch.pk).update(
        status=BatchStatus.FINALIZING if ending == BatchStatus.COMPLETED else batch.status,
        finalizing_at=now,
    )
    out: list[bytes] = []
    err: list[bytes] = []
    left = {
        BatchStatus.EXPIRED: (
            "batch_expired",
            "This request could not be executed before the completion window expired.",
        ),
        BatchStatus.CANCELLED: (
            "batch_cancelled",
            "This request was not executed: the batch was cancelled.",
        ),
    }.get(ending)  # type: ignore[call-overload]
    fields = ("index", "custom_id", "status", "request_id", "response", "error", "batch_id")
    for row in (
        BatchLine.objects.filter(batch=batch).order_by("index").values(*fields).iterator(2000)
    ):
        line = BatchLine(**row)
        if line.status == LineStatus.PENDING:
            if left is None:
                continue
            error: dict[str, Any] | None = {"code": left[0], "message": left[1]}
            response = None
        else:
            error, response = line.error, line.response
        record = {
            "id": _line_id(line),
            "custom_id": line.custom_id,
            "response": response,
            "error": error,
        }
        target = out if line.status == LineStatus.SUCCEEDED else err
        target.append(orjson.dumps(record) + b"\n")
    with transaction.atomic():
        locked = Batch.objects.locked(batch)
        if locked.status in FINISHED:
            return  # another runner ended it first
        output, errors = _write_file(locked, "output", out), _write_file(locked, "error", err)
        locked.output_file, locked.error_file = output, errors
        locked.status = ending
        setattr(locked, f"{ending}_at", timezone.now())
        lines = BatchLine.objects.filter(batch=batch)
        locked.completed = lines.filter(status=LineStatus.SUCCEEDED).count()
        locked.failed = lines.filter(status=LineStatus.FAILED).count()
        locked.save()
        _finished(locked.pk, locked.organization_id, ending)
    log.info(
        "batches.finished",
        batch_id=batch.pk,
        status=ending,
        completed=locked.completed,
        failed=locked.failed,
    )
