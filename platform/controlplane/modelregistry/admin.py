from __future__ import annotations

from typing import Any

from django.contrib import admin, messages
from django.db import transaction
from django.db.models import QuerySet
from django.http import HttpRequest

from controlplane.audit.services import Actor, audit_record

from . import services
from .models import BaseModel, CustomerModel


@admin.register(BaseModel)
class BaseModelAdmin(admin.ModelAdmin[BaseModel]):
    """Staff set prices, descriptions and availability; weights come in through
    `atelier manage import_base_model` (which refuses pickles), never through a form."""

    list_display = (
        "id",
        "family",
        "context_length",
        "price_per_1k_training_tokens",
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

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        # Jobs and customer models depend on it: deactivate it instead.
        return False


@admin.register(CustomerModel)
class CustomerModelAdmin(admin.ModelAdmin[CustomerModel]):
    """Read-only; deletion is the same soft delete as the API's, recorded in the audit log."""

    list_display = ("id", "organization", "base", "kind", "version", "created_at", "deleted_at")
    list_filter = (
        "kind",
        "artifact_kind",
        "task",
        "base",
        ("deleted_at", admin.EmptyFieldListFilter),
    )
    search_fields = ("id", "job_id", "organization__name", "organization__id")
    list_select_related = ("organization", "base")
    date_hierarchy = "created_at"
    actions = ["soft_delete"]

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> list[str]:
        return [field.name for field in CustomerModel._meta.fields]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def get_queryset(self, request: HttpRequest) -> QuerySet[CustomerModel]:
        # Staff tooling crosses tenants on purpose.
        return CustomerModel.objects.dangerously_unscoped().select_related("organization", "base")

    @admin.action(description="Delete selected models (and their stored artifacts)")
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
