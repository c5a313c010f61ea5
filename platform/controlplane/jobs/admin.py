"""Staff view of fine-tuning jobs: find a customer's job, read its events, cancel it."""

from __future__ import annotations

from typing import Any

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest

from controlplane.audit.services import Actor, audit_record
from controlplane.core.errors import ApiError

from . import services
from .models import Job, JobCheckpoint, JobEvent


class JobEventInline(admin.TabularInline[JobEvent, Job]):
    model = JobEvent
    fields = ("created_at", "level", "type", "message")
    readonly_fields = fields
    extra = 0
    can_delete = False
    ordering = ("-id",)
    max_num = 0

    def get_queryset(self, request: HttpRequest) -> QuerySet[JobEvent]:
        return JobEvent.objects.dangerously_unscoped()


class JobCheckpointInline(admin.TabularInline[JobCheckpoint, Job]):
    model = JobCheckpoint
    fields = ("step_number", "metrics", "fine_tuned_model_checkpoint", "created_at")
    readonly_fields = fields
    extra = 0
    can_delete = False
    max_num = 0

    def get_queryset(self, request: HttpRequest) -> QuerySet[JobCheckpoint]:
        return JobCheckpoint.objects.dangerously_unscoped()


@admin.register(Job)
class JobAdmin(admin.ModelAdmin[Job]):
    """Fine-tuning and compression jobs (filter by kind); a compression job's report is
    its `report` field (JSON), shown read-only."""

    list_display = (
        "id",
        "kind",
        "organization",
        "base_model",
        "method",
        "status",
        "current_step",
        "total_steps",
        "attempt",
        "lost_attempts",
        "trained_tokens",
        "created_at",
    )
    list_filter = ("kind", "status", "method", "task", "base_model")
    search_fields = ("id", "organization__name", "organization__id", "fine_tuned_model")
    readonly_fields = [f.name for f in Job._meta.fields]
    inlines = [JobCheckpointInline, JobEventInline]
    actions = ["cancel_jobs"]

    def get_queryset(self, request: HttpRequest) -> QuerySet[Job]:
        return Job.objects.dangerously_unscoped().select_related("organization", "base_model")

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    @admin.action(description="Cancel selected jobs")
    def cancel_jobs(self, request: HttpRequest, queryset: QuerySet[Job]) -> None:
        done = 0
        for job in queryset:
            try:
                services.job_cancel(job=job)
            except ApiError:
                continue
            audit_record(
                organization=job.organization_id,
                actor=Actor.from_request(request),
                action=f"admin.{job.kind}_job.cancelled",
                target=job,
                details={},
            )
            done += 1
        self.message_user(request, f"Cancelled {done} job(s).", messages.SUCCESS)
