"""The training and validation data a job names: a fine-tune file or a dataset version."""

from __future__ import annotations

from controlplane.core.errors import ApiError, NotFound
from controlplane.datasets import catalog
from controlplane.datasets.models import DatasetVersion, File, FileStatus, VersionStatus
from controlplane.tenancy.models import Organization


def training_file_get(organization: Organization, file_id: str, param: str) -> File:
    file = (
        File.objects.for_organization(organization)
        .filter(pk=file_id, deleted_at__isnull=True)
        .first()
    )
    if file is None:
        raise NotFound(f"No file with id '{file_id}' found.", param=param)
    if file.purpose != "fine-tune":
        raise ApiError(
            f"File '{file_id}' was uploaded with purpose '{file.purpose}'; upload it with "
            "purpose 'fine-tune'.",
            param=param,
            code="invalid_file_purpose",
        )
    if file.status != FileStatus.PROCESSED:
        detail = (
            "is still being validated: wait until its status is 'processed'"
            if file.status in (FileStatus.UPLOADED, FileStatus.PROCESSING)
            else f"failed validation ({file.status_details or 'see its validation report'})"
        )
        raise ApiError(f"File '{file_id}' {detail}.", param=param, code="invalid_file_status")
    return file


def training_version_get(organization: Organization, version_id: str) -> DatasetVersion:
    """A ready dataset version the organization may train on (its own, or a partner's it
    holds a grant for); the same 404 for every other id."""
    try:
        version = catalog.usable_version(organization=organization, version_id=version_id)
    except NotFound:
        raise NotFound(
            f"No dataset version with id '{version_id}' found (a partner's version "
            "needs an approved access request).",
            param="dataset",
        ) from None
    if version.status != VersionStatus.READY:
        raise ApiError(
            f"Dataset version '{version.pk}' is {version.status}; wait until it is ready.",
            param="dataset",
            code="invalid_dataset_status",
        )
    return version


def data_summary(source: File | DatasetVersion) -> tuple[str, int, list[str]]:
    """(format, rows, labels) of a validated file or a built version."""
    if isinstance(source, File):
        report = source.validation or {}
        labels = sorted((report.get("label_counts") or {}).keys())
        return str(report.get("format") or ""), int(report.get("rows") or 0), labels
    report = source.report or {}
    validation = report.get("validation") or report
    labels = sorted((validation.get("label_counts") or {}).keys())
    return source.format, source.rows, labels
