"""Staff views of files, uploads, datasets and the catalog.

Files and dataset versions are read-only (their content is what jobs trained on); their
validation and preprocessing reports are shown as tables on the page. Staff delete a file
the way the API does (soft), edit a listing through `catalog.listing_update`, and decide
access requests through `catalog.access_decide`; each is audited.
"""

from __future__ import annotations

from typing import Any

from django.contrib import admin, messages
from django.db import transaction
from django.db.models import QuerySet
from django.forms import ModelForm
from django.http import HttpRequest
from django.template.defaultfilters import filesizeformat
from django.utils.safestring import SafeString

from controlplane.audit.admin import ReadOnlyAdmin, count_of, report_html, staff_audit

from . import catalog, services
from .models import (
    AccessGrant,
    AccessStatus,
    Dataset,
    DatasetVersion,
    File,
    Listing,
    PartnerUsage,
    Upload,
    UploadPart,
)

# --- files and uploads ----------------------------------------------------------------------


@admin.register(File)
class FileAdmin(admin.ModelAdmin[File]):
    list_display = (
        "filename",
        "id",
        "organization",
        "purpose",
        "size",
        "status",
        "rows",
        "errors",
        "created_at",
        "deleted_at",
    )
    list_filter = (
        "status",
        "purpose",
        ("deleted_at", admin.EmptyFieldListFilter),
        "created_at",
    )
    search_fields = (
        "id",
        "filename",
        "sha256",
        "organization__name",
        "organization__id",
        "created_by__email",
    )
    list_select_related = ("organization",)
    date_hierarchy = "created_at"
    fields = (
        "id",
        "organization",
        "filename",
        "purpose",
        "bytes",
        "sha256",
        "status",
        "status_details",
        "validation_report",
        "created_by",
        "created_at",
        "deleted_at",
        "storage_name",
    )
    readonly_fields = fields
    actions = ["soft_delete"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False  # jobs keep pointing at files: the soft delete below, as the API does

    def has_soft_delete_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm("datasets.delete_file")

    @admin.display(description="Size", ordering="bytes")
    def size(self, obj: File) -> str:
        return filesizeformat(obj.bytes)

    @admin.display(description="Rows")
    def rows(self, obj: File) -> Any:
        return (obj.validation or {}).get("rows", "-")

    @admin.display(description="Errors")
    def errors(self, obj: File) -> Any:
        return (obj.validation or {}).get("error_count", "-")

    @admin.display(description="Validation report")
    def validation_report(self, obj: File) -> SafeString:
        return report_html(obj.validation)

    @admin.action(
        description="Delete selected files (as the API does)", permissions=["soft_delete"]
    )
    def soft_delete(self, request: HttpRequest, queryset: QuerySet[File]) -> None:
        live = list(queryset.filter(deleted_at__isnull=True))
        for file in live:
            with transaction.atomic():
                services.file_delete(file=file)
                staff_audit(
                    request,
                    organization=file.organization_id,
                    action="admin.file.deleted",
                    target_type="file",
                    details={"file_id": file.pk, "filename": file.filename},
                )
        self.message_user(request, f"Deleted {len(live)} file(s).", messages.SUCCESS)


class UploadPartInline(admin.TabularInline[UploadPart, Upload]):
    model = UploadPart
    extra = 0
    max_num = 0
    can_delete = False
    fields = ("id", "bytes", "sha256", "created_at")
    readonly_fields = fields


@admin.register(Upload)
class UploadAdmin(ReadOnlyAdmin):
    list_display = (
        "filename",
        "id",
        "organization",
        "purpose",
        "declared_size",
        "upload_status",
        "parts",
        "file",
        "expires_at",
        "created_at",
    )
    list_filter = ("status", "purpose", "created_at")
    search_fields = ("id", "filename", "organization__name", "organization__id", "file__id")
    list_select_related = ("organization", "file")
    date_hierarchy = "created_at"
    inlines = (UploadPartInline,)

    def get_queryset(self, request: HttpRequest) -> QuerySet[Upload]:
        queryset: QuerySet[Upload] = super().get_queryset(request)
        return queryset.annotate(part_count=count_of(UploadPart._plain.all(), "upload"))

    @admin.display(description="Declared size", ordering="bytes")
    def declared_size(self, obj: Upload) -> str:
        return filesizeformat(obj.bytes)

    @admin.display(description="Status", ordering="status")
    def upload_status(self, obj: Upload) -> str:
        return obj.current_status()

    @admin.display(description="Parts", ordering="part_count")
    def parts(self, obj: Any) -> int:
        return int(obj.part_count)


# --- datasets and versions ------------------------------------------------------------------


class DatasetVersionInline(admin.TabularInline[DatasetVersion, Dataset]):
    model = DatasetVersion
    extra = 0
    max_num = 0
    can_delete = False
    fields = ("number", "status", "format", "rows", "bytes", "created_at")
    readonly_fields = fields
    show_change_link = True
    ordering = ("-number",)


@admin.register(Dataset)
class DatasetAdmin(ReadOnlyAdmin):
    list_display = ("name", "id", "organization", "versions", "created_at")
    list_filter = ("created_at",)
    search_fields = ("id", "name", "organization__name", "organization__id")
    list_select_related = ("organization",)
    inlines = (DatasetVersionInline,)

    def get_queryset(self, request: HttpRequest) -> QuerySet[Dataset]:
        queryset: QuerySet[Dataset] = super().get_queryset(request)
        return queryset.annotate(version_count=count_of(DatasetVersion._plain.all(), "dataset"))

    @admin.display(description="Versions", ordering="version_count")
    def versions(self, obj: Any) -> int:
        return int(obj.version_count)


@admin.register(DatasetVersion)
class DatasetVersionAdmin(ReadOnlyAdmin):
    """Immutable once ready; its preprocessing report (rows in and out, what was removed
    and why, PII found) is shown as a table."""

    list_display = (
        "dataset_name",
        "number",
        "id",
        "organization",
        "format",
        "status",
        "rows",
        "size",
        "sources",
        "created_at",
    )
    list_filter = ("status", "format", "created_at")
    search_fields = (
        "id",
        "sha256",
        "dataset__id",
        "dataset__name",
        "organization__name",
        "organization__id",
    )
    list_select_related = ("organization", "dataset")
    date_hierarchy = "created_at"
    fields = (
        "id",
        "organization",
        "dataset",
        "number",
        "status",
        "status_details",
        "format",
        "rows",
        "bytes",
        "sha256",
        "source_files",
        "recipe_table",
        "preprocessing_report",
        "storage_name",
        "created_at",
    )
    readonly_fields = fields

    @admin.display(description="Dataset", ordering="dataset__name")
    def dataset_name(self, obj: DatasetVersion) -> str:
        return obj.dataset.name

    @admin.display(description="Size", ordering="bytes")
    def size(self, obj: DatasetVersion) -> str:
        return filesizeformat(obj.bytes)

    @admin.display(description="Source files")
    def sources(self, obj: DatasetVersion) -> int:
        return len(obj.source_files or [])

    @admin.display(description="Recipe")
    def recipe_table(self, obj: DatasetVersion) -> SafeString:
        return report_html(obj.recipe)

    @admin.display(description="Preprocessing report")
    def preprocessing_report(self, obj: DatasetVersion) -> SafeString:
        return report_html(obj.report)


# --- the catalog ----------------------------------------------------------------------------


#: What staff may change on a listing: the fields `catalog.listing_update` accepts.
LISTING_EDITABLE = (
    "title",
    "description",
    "license_terms",
    "auto_approve",
    "published",
    "price_per_1k_tokens",
)


@admin.register(Listing)
class ListingAdmin(admin.ModelAdmin[Listing]):
    list_display = (
        "title",
        "id",
        "organization",
        "version",
        "price_per_1k_tokens",
        "published",
        "auto_approve",
        "pending_requests",
        "approved_requests",
        "created_at",
    )
    list_filter = ("published", "auto_approve", "created_at")
    search_fields = ("id", "title", "organization__name", "organization__id", "version__id")
    list_select_related = ("organization", "version")
    fields = ("id", "organization", "version", *LISTING_EDITABLE, "sample_rows", "created_at")
    readonly_fields = ("id", "organization", "version", "sample_rows", "created_at")
    actions = ["publish", "unpublish"]

    def get_queryset(self, request: HttpRequest) -> QuerySet[Listing]:
        grants = AccessGrant._plain.all()
        return (
            super()
            .get_queryset(request)
            .annotate(
                pending=count_of(grants.filter(status=AccessStatus.PENDING), "listing"),
                approved=count_of(grants.filter(status=AccessStatus.APPROVED), "listing"),
            )
        )

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # partners publish through the API (it checks the version and samples)

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False  # usage and grants keep pointing at it: unpublish instead

    @admin.display(description="Pending", ordering="pending")
    def pending_requests(self, obj: Any) -> int:
        return int(obj.pending)

    @admin.display(description="Approved", ordering="approved")
    def approved_requests(self, obj: Any) -> int:
        return int(obj.approved)

    def _update(self, request: HttpRequest, listing: Listing, changes: dict[str, Any]) -> None:
        with transaction.atomic():
            catalog.listing_update(listing=listing, changes=changes)
            staff_audit(
                request,
                organization=listing.organization_id,
                action="admin.listing.changed",
                target_type="listing",
                details={"listing_id": listing.pk, **{k: str(v) for k, v in changes.items()}},
            )

    def save_model(
        self, request: HttpRequest, obj: Listing, form: ModelForm[Listing], change: bool
    ) -> None:
        changes = {name: form.cleaned_data[name] for name in form.changed_data}
        if changes:
            self._update(request, obj, changes)

    @admin.action(description="Publish selected listings", permissions=["change"])
    def publish(self, request: HttpRequest, queryset: QuerySet[Listing]) -> None:
        for listing in queryset.filter(published=False):
            self._update(request, listing, {"published": True})
        self.message_user(request, "Published.", messages.SUCCESS)

    @admin.action(description="Unpublish selected listings", permissions=["change"])
    def unpublish(self, request: HttpRequest, queryset: QuerySet[Listing]) -> None:
        for listing in queryset.filter(published=True):
            self._update(request, listing, {"published": False})
        self.message_user(request, "Unpublished.", messages.SUCCESS)


@admin.register(AccessGrant)
class AccessGrantAdmin(admin.ModelAdmin[AccessGrant]):
    """Customers' requests for listings (owned by the customer); staff decide them for the
    partner, through the same service as the partner's API."""

    list_display = (
        "id",
        "organization",
        "listing_title",
        "partner",
        "status",
        "note",
        "created_at",
        "decided_at",
    )
    list_filter = ("status", "created_at", "decided_at")
    search_fields = (
        "id",
        "note",
        "organization__name",
        "organization__id",
        "listing__id",
        "listing__title",
        "listing__organization__name",
    )
    list_select_related = ("organization", "listing__organization")
    date_hierarchy = "created_at"
    fields = ("id", "organization", "listing", "status", "note", "created_at", "decided_at")
    readonly_fields = fields
    actions = ["approve", "decline"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    @admin.display(description="Listing", ordering="listing__title")
    def listing_title(self, obj: AccessGrant) -> str:
        return obj.listing.title

    @admin.display(description="Partner", ordering="listing__organization__name")
    def partner(self, obj: AccessGrant) -> str:
        return str(obj.listing.organization)

    def _decide(self, request: HttpRequest, queryset: QuerySet[AccessGrant], approve: bool) -> None:
        target = AccessStatus.APPROVED if approve else AccessStatus.DECLINED
        decided = 0
        for grant in queryset.exclude(status=target).select_related("listing__organization"):
            partner = grant.listing.organization
            with transaction.atomic():
                catalog.access_decide(partner=partner, grant_id=grant.pk, approve=approve)
                details = {
                    "access_request_id": grant.pk,
                    "listing_id": grant.listing_id,
                    "customer_id": grant.organization_id,
                    "from": grant.status,
                    "to": target,
                }
                verb = "approved" if approve else "declined"
                # In both logs: the customer's access changes, on the partner's data.
                for org in {grant.organization_id, partner.pk}:
                    staff_audit(
                        request,
                        organization=org,
                        action=f"admin.access_request.{verb}",
                        target_type="access_request",
                        details=details,
                    )
            decided += 1
        self.message_user(request, f"{target.capitalize()} {decided} request(s).", messages.SUCCESS)

    @admin.action(description="Approve selected access requests", permissions=["change"])
    def approve(self, request: HttpRequest, queryset: QuerySet[AccessGrant]) -> None:
        self._decide(request, queryset, approve=True)

    @admin.action(description="Decline selected access requests", permissions=["change"])
    def decline(self, request: HttpRequest, queryset: QuerySet[AccessGrant]) -> None:
        self._decide(request, queryset, approve=False)


@admin.register(PartnerUsage)
class PartnerUsageAdmin(ReadOnlyAdmin):
    """Tokens customers trained on partners' listings: what royalties are paid on."""

    list_display = (
        "created_at",
        "organization",
        "listing_title",
        "customer",
        "job_id",
        "trained_tokens",
        "price_per_1k_tokens",
        "earned",
    )
    list_filter = ("created_at",)
    search_fields = (
        "job_id",
        "listing__id",
        "listing__title",
        "organization__name",
        "organization__id",
        "customer__name",
        "customer__id",
    )
    list_select_related = ("organization", "listing", "customer")
    date_hierarchy = "created_at"

    @admin.display(description="Listing", ordering="listing__title")
    def listing_title(self, obj: PartnerUsage) -> str:
        return obj.listing.title

    @admin.display(description="Earned (USD)")
    def earned(self, obj: PartnerUsage) -> str:
        return f"{obj.amount:.6f}"
