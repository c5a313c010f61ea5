"""Writes for the datasets app, one module per concern; the public names live here."""

from .files import (
    file_create,
    file_delete,
    file_validate,
    filename_check,
    purpose_check,
    quota_reserve,
    size_check,
)
from .uploads import (
    upload_add_part,
    upload_cancel,
    upload_complete,
    upload_create,
    upload_expire_due,
)
from .versions import dataset_create, version_build, version_create

__all__ = [
    "dataset_create",
    "file_create",
    "file_delete",
    "file_validate",
    "filename_check",
    "purpose_check",
    "quota_reserve",
    "size_check",
    "upload_add_part",
    "upload_cancel",
    "upload_complete",
    "upload_create",
    "upload_expire_due",
    "version_build",
    "version_create",
]
