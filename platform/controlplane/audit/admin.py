from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.db import models, transaction
from django.db.models import QuerySet
from django.forms import ModelForm
from django.http import HttpRequest

from .models import AuditLog
from .services import Actor, audit_record


class AuditedAdmin(admin.ModelAdmin[Any]):
    """Staff changes that affect access are written to the organization's audit log."""

    audit_target_type = ""

    def _org_id(self, obj: models.Model) -> str:
        return str(obj.pk if self.audit_target_type == "organization" else obj.organization_id)  # type: ignore[attr-defined]

    def _record(
        self, request: HttpRequest, obj: models.Model, verb: str, details: dict[str, Any]
    ) -> None:
        audit_record(
            organization=self._org_id(obj),
            actor=Actor.from_request(request),
            action=f"admin.{self.audit_target_type}.{verb}",
            target=obj,
            details=details,
        )

    @transaction.atomic
    def save_model(
        self, request: HttpRequest, obj: Any, form: ModelForm[Any], change: bool
    ) -> None:
        super().save_model(request, obj, form, change)
        changed = {name: str(form.cleaned_data.get(name)) for name in form.changed_data}
        self._record(request, obj, "changed" if change else "created", changed)

    @transaction.atomic
    def delete_model(self, request: HttpRequest, obj: Any) -> None:
        self._record(request, obj, "deleted", {"repr": str(obj)})
        super().delete_model(request, obj)

    @transaction.atomic
    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> None:
        for obj in queryset:
            self._record(request, obj, "deleted", {"repr": str(obj)})
        super().delete_queryset(request, queryset)


@admin.register(AuditLog)
class AuditLogAdmin(admin.ModelAdmin[AuditLog]):
    list_display = (
        "created_at",
        "organization",
        "action",
        "actor_type",
        "actor_email",
        "target_type",
        "target_id",
        "ip_address",
    )
    list_filter = ("action", "actor_type", "target_type")
    search_fields = (
        "organization__name",
        "organization__id",
        "actor_email",
        "actor_id",
        "target_id",
        "request_id",
    )
    date_hierarchy = "created_at"
    list_select_related = ("organization",)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False
