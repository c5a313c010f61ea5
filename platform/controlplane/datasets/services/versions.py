"""Datasets and their immutable, content-hashed versions."""

from __future__ import annotations

import io
import tempfile

import structlog
from django.db import transaction
from django.db.models import Max

from controlplane.core.errors import ApiError, Conflict, NotFound
from controlplane.tenancy.models import Organization

from .. import storage
from ..models import (
    Dataset,
    DatasetVersion,
    File,
    FileStatus,
    VersionStatus,
)

log = structlog.get_logger(__name__)

# --- datasets and versions -------------------------------------------------------------------


def dataset_create(*, organization: Organization, name: str, description: str) -> Dataset:
    return Dataset.objects.create(organization=organization, name=name, description=description)


@transaction.atomic
def version_create(
    *, dataset: Dataset, file_ids: list[str], recipe: dict[str, object]
) -> DatasetVersion:
    """Start building a new immutable version from processed files and a recipe."""
    from ..preprocess import Recipe

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
    from ..tasks import build_version

    transaction.on_commit(lambda: build_version.delay(version.pk, version.organization_id))
    return version


def version_build(*, version_id: str, organization_id: str) -> DatasetVersion:
    """Concatenate the source files, preprocess them streaming, store the result."""
    from ..preprocess import Recipe, preprocess_stream

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
