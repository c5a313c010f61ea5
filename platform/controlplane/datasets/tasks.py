"""Dataset tasks on the `control` queue: they take ids, call a service, and are safe to rerun."""

from __future__ import annotations

from celery import shared_task

from jobcontracts import queues

from . import services


@shared_task(
    name="controlplane.datasets.validate_file",
    queue=queues.CONTROL,
    acks_late=True,
    soft_time_limit=3 * 3600,
    time_limit=3 * 3600 + 60,
)
def validate_file(file_id: str, organization_id: str) -> str:
    return services.file_validate(file_id=file_id, organization_id=organization_id).status


@shared_task(
    name="controlplane.datasets.build_version",
    queue=queues.CONTROL,
    acks_late=True,
    soft_time_limit=6 * 3600,
    time_limit=6 * 3600 + 60,
)
def build_version(version_id: str, organization_id: str) -> str:
    return services.version_build(version_id=version_id, organization_id=organization_id).status


@shared_task(
    name="controlplane.datasets.expire_uploads",
    queue=queues.CONTROL,
    acks_late=True,
    soft_time_limit=240,
    time_limit=300,
    expires=300,
)
def expire_uploads() -> int:
    """Beat, every few minutes: expire uploads past their deadline and delete their parts."""
    return services.upload_expire_due()
