"""Staff view of deployments (find one, soft-delete it) and of the usage ledger (read-only)."""

from __future__ import annotations

from typing import Any

from django.contrib import admin, messages
from django.db import transaction
from django.db.models import QuerySet
from django.http import HttpRequest

from controlplane.audit.admin import ReadOnlyAdmin
from controlplane.audit.services import Actor, audit_record

from . import deployments
from .models import Deployment, UsageRecord


@admin.register(Deployment)
class DeploymentAdmin(admin.ModelAdmin[Deployment]):
    """Read-only: replicas change through the API's validation; deletion is the API's soft
    delete, recorded in the organization's audit log."""

    list_display = (
        "id",
        "organization",
        "model_id",
        "type",
        "min_replicas",
        "max_replicas",
        "status",
        "created_at",
    )
    list_filter = ("type", "status", "created_at")
    search_fields = ("id", "model_id", "organization__name", "organization__id")
    date_hierarchy = "created_at"
    readonly_fields = [f.name for f in Deployment._meta.fields]
    actions = ["delete_deployments"]

    def get_queryset(self, request: HttpRequest) -> QuerySet[Deployment]:
        return Deployment.objects.dangerously_unscoped().select_related("organization")

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_soft_delete_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm("inference.delete_deployment")

    @admin.action(
        description="Delete selected deployments (the models stop being callable)",
        permissions=["soft_delete"],
    )
    def delete_deployments(self, request: HttpRequest, queryset: QuerySet[Deployment]) -> None:
        done = 0
        for deployment in queryset.filter(status="active"):
            with transaction.atomic():
                deployments.deployment_delete(deployment=deployment)
                audit_record(
                    organization=deployment.organization_id,
                    actor=Actor.from_request(request),
                    action="admin.deployment.deleted",
                    target=deployment,
                    target_type="deployment",
                    details={"model": deployment.model_id},
                )
            done += 1
        self.message_user(request, f"Deleted {done} deployment(s).", messages.SUCCESS)


@admin.register(UsageRecord)
class UsageRecordAdmin(ReadOnlyAdmin):
    """The ledger is written by workers' reports only: staff read it, never edit it."""

    list_display = (
        "request_id",
        "organization",
        "model",
        "kind",
        "prompt_tokens",
        "completion_tokens",
        "total_tokens",
        "status",
        "latency_ms",
        "api_key_id",
        "created_at",
    )
    list_filter = ("kind", "status", "created_at")
    search_fields = ("request_id", "model", "api_key_id", "organization__name", "organization__id")
    date_hierarchy = "created_at"
    readonly_fields = [f.name for f in UsageRecord._meta.fields]
    # One row per inference request: counting them all on every page is the slow part.
    show_full_result_count = False

    def get_queryset(self, request: HttpRequest) -> QuerySet[UsageRecord]:
        return UsageRecord.objects.dangerously_unscoped().select_related("organization")
