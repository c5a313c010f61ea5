"""Files (OpenAI-compatible) and resumable uploads, stored in object storage.

Object names are generated here (`files/<org>/<file id>`), never taken from the
client's filename, which is kept only as metadata.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal

from django.db import models
from django.utils import timezone

from controlplane.core.ids import (
    new_access_id,
    new_dataset_id,
    new_dataset_version_id,
    new_file_id,
    new_listing_id,
    new_part_id,
    new_upload_id,
    new_usage_id,
)
from controlplane.core.scoping import OrganizationOwned, OrganizationScopedManager

#: The purposes a client may upload a file (or an upload) with.
UPLOAD_PURPOSES = ("fine-tune", "batch", "distillation", "evals", "user_data")
#: Every purpose a file may have: the uploadable ones and the one only the platform
#: writes, OpenAI's `batch_output` (a batch's output and error files).
PURPOSES = (*UPLOAD_PURPOSES, "batch_output")


class FileStatus(models.TextChoices):
    UPLOADED = "uploaded"
    PROCESSING = "processing"
    PROCESSED = "processed"
    ERROR = "error"


class File(OrganizationOwned):
    id = models.CharField(primary_key=True, max_length=40, default=new_file_id, editable=False)
    filename = models.CharField(max_length=255)
    purpose = models.CharField(max_length=32, choices=[(p, p) for p in PURPOSES])
    bytes = models.BigIntegerField()
    sha256 = models.CharField(max_length=64)
    storage_name = models.CharField(max_length=300, editable=False)
    status = models.CharField(
        max_length=16, choices=FileStatus.choices, default=FileStatus.UPLOADED
    )
    status_details = models.TextField(blank=True)
    #: Streaming validation result: format, rows, first errors, error count, distributions.
    validation = models.JSONField(null=True, blank=True)
    created_by = models.ForeignKey(
        "accounts.User", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    deleted_at = models.DateTimeField(null=True, blank=True)

    objects = OrganizationScopedManager["File"]()

    class Meta(OrganizationOwned.Meta):
        indexes = [models.Index(fields=["organization", "-id"], name="file_org_id")]

    def __str__(self) -> str:
        return f"{self.filename} ({self.id})"


class UploadStatus(models.TextChoices):
    PENDING = "pending"
    COMPLETED = "completed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"


class Upload(OrganizationOwned):
    """A large file sent in parts; assembled and checksum-verified on completion."""

    id = models.CharField(primary_key=True, max_length=40, default=new_upload_id, editable=False)
    filename = models.CharField(max_length=255)
    purpose = models.CharField(max_length=32, choices=[(p, p) for p in UPLOAD_PURPOSES])
    bytes = models.BigIntegerField(help_text="The total size the client declared.")
    mime_type = models.CharField(max_length=100, blank=True)
    sha256 = models.CharField(max_length=64, blank=True, help_text="Expected, if declared.")
    status = models.CharField(
        max_length=16, choices=UploadStatus.choices, default=UploadStatus.PENDING
    )
    file = models.OneToOneField(
        File, null=True, blank=True, on_delete=models.SET_NULL, related_name="upload"
    )
    created_by = models.ForeignKey(
        "accounts.User", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    expires_at = models.DateTimeField()

    objects = OrganizationScopedManager["Upload"]()

    class Meta(OrganizationOwned.Meta):
        indexes = [
            # The expiry reaper's scan: pending uploads by deadline.
            models.Index(
                fields=["expires_at"],
                condition=models.Q(status="pending"),
                name="upload_pending_expiry",
            )
        ]

    def __str__(self) -> str:
        return f"{self.filename} ({self.id}, {self.status})"

    def is_expired(self, now: datetime | None = None) -> bool:
        """Pending past its deadline: expired, whether or not the reaper has recorded it yet."""
        if self.status == UploadStatus.EXPIRED:
            return True
        return self.status == UploadStatus.PENDING and self.expires_at <= (now or timezone.now())

    def current_status(self, now: datetime | None = None) -> str:
        """The status a client sees: `expired` from `expires_at` on, not from the reaper's run."""
        return UploadStatus.EXPIRED if self.is_expired(now) else self.status


class UploadPart(OrganizationOwned):
    id = models.CharField(primary_key=True, max_length=40, default=new_part_id, editable=False)
    upload = models.ForeignKey(Upload, on_delete=models.CASCADE, related_name="parts")
    bytes = models.BigIntegerField()
    sha256 = models.CharField(max_length=64)
    storage_name = models.CharField(max_length=300, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)

    objects = OrganizationScopedManager["UploadPart"]()

    class Meta(OrganizationOwned.Meta):
        pass

    def __str__(self) -> str:
        return f"{self.id} of {self.upload_id}"


class Dataset(OrganizationOwned):
    """A named series of immutable versions; fine-tuning jobs reference a version."""

    id = models.CharField(primary_key=True, max_length=40, default=new_dataset_id, editable=False)
    name = models.CharField(max_length=200)
    description = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    objects = OrganizationScopedManager["Dataset"]()

    class Meta(OrganizationOwned.Meta):
        pass

    def __str__(self) -> str:
        return f"{self.name} ({self.id})"


class VersionStatus(models.TextChoices):
    PROCESSING = "processing"
    READY = "ready"
    ERROR = "error"


class DatasetVersion(OrganizationOwned):
    """Source files + a preprocessing recipe → one stored, content-hashed object.

    Never changed once ready: a different recipe or different files make a new
    version. `sha256` is the hash of the produced content.
    """

    id = models.CharField(
        primary_key=True, max_length=40, default=new_dataset_version_id, editable=False
    )
    dataset = models.ForeignKey(Dataset, on_delete=models.CASCADE, related_name="versions")
    number = models.PositiveIntegerField()
    source_files = models.JSONField(default=list, help_text="Ids of the files it was built from.")
    recipe = models.JSONField(default=dict)
    format = models.CharField(max_length=32, blank=True)
    status = models.CharField(
        max_length=16, choices=VersionStatus.choices, default=VersionStatus.PROCESSING
    )
    status_details = models.TextField(blank=True)
    storage_name = models.CharField(max_length=300, blank=True, editable=False)
    bytes = models.BigIntegerField(default=0)
    sha256 = models.CharField(max_length=64, blank=True)
    rows = models.BigIntegerField(default=0)
    report = models.JSONField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    objects = OrganizationScopedManager["DatasetVersion"]()

    class Meta(OrganizationOwned.Meta):
        constraints = [
            models.UniqueConstraint(fields=["dataset", "number"], name="one_number_per_version")
        ]

    def __str__(self) -> str:
        return f"{self.dataset_id} v{self.number} ({self.status})"


class Listing(OrganizationOwned):
    """A data partner's dataset version offered in the catalog.

    Owned by the partner; published listings are readable by every organization
    (that is the catalog's point), but only their title, terms and sample rows.
    """

    id = models.CharField(primary_key=True, max_length=40, default=new_listing_id, editable=False)
    version = models.ForeignKey(DatasetVersion, on_delete=models.PROTECT, related_name="listings")
    title = models.CharField(max_length=200)
    description = models.TextField(blank=True)
    license_terms = models.TextField()
    sample_rows = models.JSONField(default=list)
    price_per_1k_tokens = models.DecimalField(max_digits=12, decimal_places=6)
    auto_approve = models.BooleanField(default=False)
    published = models.BooleanField(default=True)
    created_at = models.DateTimeField(auto_now_add=True)

    objects = OrganizationScopedManager["Listing"]()

    class Meta(OrganizationOwned.Meta):
        pass

    def __str__(self) -> str:
        return f"{self.title} ({self.id})"


class AccessStatus(models.TextChoices):
    PENDING = "pending"
    APPROVED = "approved"
    DECLINED = "declined"


class AccessGrant(OrganizationOwned):
    """A customer's request for a listing, and (once approved) its licence to train on it.

    Owned by the customer; the partner sees the requests on its own listings.
    """

    id = models.CharField(primary_key=True, max_length=40, default=new_access_id, editable=False)
    listing = models.ForeignKey(Listing, on_delete=models.CASCADE, related_name="grants")
    status = models.CharField(
        max_length=16, choices=AccessStatus.choices, default=AccessStatus.PENDING
    )
    note = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    decided_at = models.DateTimeField(null=True, blank=True)

    objects = OrganizationScopedManager["AccessGrant"]()

    class Meta(OrganizationOwned.Meta):
        constraints = [
            models.UniqueConstraint(
                fields=["organization", "listing"], name="one_grant_per_listing"
            )
        ]

    def __str__(self) -> str:
        return f"{self.organization_id} → {self.listing_id} ({self.status})"


class PartnerUsage(OrganizationOwned):
    """Tokens a customer's job trained on a partner's listing; owned by the partner.

    One row per (job, listing): a job that runs in several attempts records once.
    """

    id = models.CharField(primary_key=True, max_length=40, default=new_usage_id, editable=False)
    listing = models.ForeignKey(Listing, on_delete=models.PROTECT, related_name="usage")
    customer = models.ForeignKey("tenancy.Organization", on_delete=models.PROTECT, related_name="+")
    job_id = models.CharField(max_length=40)
    trained_tokens = models.BigIntegerField()
    price_per_1k_tokens = models.DecimalField(max_digits=12, decimal_places=6)
    created_at = models.DateTimeField(auto_now_add=True)

    objects = OrganizationScopedManager["PartnerUsage"]()

    class Meta(OrganizationOwned.Meta):
        constraints = [
            models.UniqueConstraint(fields=["job_id", "listing"], name="one_usage_per_job")
        ]

    def __str__(self) -> str:
        return f"{self.trained_tokens} tokens of {self.listing_id} by {self.job_id}"

    #: What the partner earned for this row, as a database expression (for sums).
    AMOUNT = models.ExpressionWrapper(
        models.F("trained_tokens") * models.F("price_per_1k_tokens") / 1000,
        output_field=models.DecimalField(max_digits=30, decimal_places=12),
    )

    @property
    def amount(self) -> Decimal:
        return self.trained_tokens * self.price_per_1k_tokens / 1000
