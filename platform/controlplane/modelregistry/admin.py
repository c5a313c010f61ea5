from __future__ import annotations

from typing import Any

from django.contrib import admin, messages
from django.db import transaction
from django.db.models import QuerySet
from django.http import HttpRequest
from django.utils.safestring import SafeString

from controlplane.audit.admin import count_of, report_html
from controlplane.audit.services import Actor, audit_record

from . import services
from .models import BaseModel, CustomerModel


def _has_field(model: type[Any], name: str) -> bool:
    return any(f.name == name for f in model._meta.get_fields())


@admin.register(BaseModel)
class BaseModelAdmin(admin.ModelAdmin[BaseModel]):
    """Staff set prices, descriptions and availability; weights come in through
    `atelier manage import_base_model` (which refuses pickles), never through a form."""

    list_display = (
        "id",
        "family",
        "context_length",
        "price_per_1k_training_tokens",
        "customer_models",
        "is_active",
        "created_at",
    )
    list_filter = ("family", "is_active")
    search_fields = ("id", "family", "description")
    list_editable = ("is_active",)
    fields = (
        "id",
        "family",
        "tasks",
        "methods",
        "adapters",
        "context_length",
        "uri",
        "price_per_1k_training_tokens",
        "description",
        "is_active",
        "created_at",
    )
    readonly_fields = ("id", "family", "context_length", "uri", "created_at")

    def get_queryset(self, request: HttpRequest) -> QuerySet[BaseModel]:
        models = count_of(CustomerModel._plain.filter(deleted_at__isnull=True), "base")
        return super().get_queryset(request).annotate(model_count=models)

    @admin.display(description="Customer models", ordering="model_count")
    def customer_models(self, obj: Any) -> int:
        return int(obj.model_count)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        # Jobs and customer models depend on it: deactivate it instead.
        return False


@admin.register(CustomerModel)
class CustomerModelAdmin(admin.ModelAdmin[CustomerModel]):
    """Read-only; deletion is the same soft delete as the API's, recorded in the audit log."""

    list_display = (
        "id",
        "organization",
        "base",
        "kind",
        "version",
        "step",
        "task",
        "artifact_kind",
        "compressed",
        "job_id",
        "created_at",
        "deleted_at",
    )
    list_filter = (
        "kind",
        "artifact_kind",
        "task",
        "base",
        ("deleted_at", admin.EmptyFieldListFilter),
        "created_at",
    )
    search_fields = ("id", "job_id", "suffix", "organization__name", "organization__id")
    list_select_related = ("organization", "base")
    date_hierarchy = "created_at"
    actions = ["soft_delete"]

    # A model an engagement built is hidden from its organization until delivered.
    def get_list_display(self, request: HttpRequest) -> Any:
        if _has_field(CustomerModel, "engagement_id"):
            return (*self.list_display, "engagement_id", "delivered_at")
        return self.list_display

    def get_list_filter(self, request: HttpRequest) -> Any:
        if _has_field(CustomerModel, "engagement_id"):
            return (*self.list_filter, ("engagement_id", admin.EmptyFieldListFilter))
        return self.list_filter

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> list[str]:
        return [field.name for field in CustomerModel._meta.fields] + ["compression_report"]

    @admin.display(description="Compressed", boolean=True)
    def compressed(self, obj: CustomerModel) -> bool:
        return obj.compression is not None

    @admin.display(description="Compression")
    def compression_report(self, obj: CustomerModel) -> SafeString:
        return report_html(obj.compression)

    def has_soft_delete_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm("modelregistry.delete_customermodel")

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def get_queryset(self, request: HttpRequest) -> QuerySet[CustomerModel]:
        # Staff tooling crosses tenants on purpose.
        return CustomerModel.objects.dangerously_unscoped().select_related("organization", "base")

    @admin.action(
        description="Delete selected models (and their stored artifacts)",
        permissions=["soft_delete"],
    )
    def soft_delete(self, request: HttpRequest, queryset: QuerySet[CustomerModel]) -> None:
        actor = Actor.from_request(request)
        live = list(queryset.filter(deleted_at__isnull=True))
        for model in live:
            with transaction.atomic():
                services.customer_model_delete(organization=model.organization, model=model)
                audit_record(
                    organization=model.organization_id,
                    actor=actor,
                    action="admin.model.deleted",
                    target_type="model",
                    details={"model_id": model.pk},
                )
        self.message_user(request, f"Deleted {len(live)} model(s).", messages.SUCCESS)
