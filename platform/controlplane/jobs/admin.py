"""Staff view of fine-tuning and compression jobs (one `Job` model, by `kind`).

The list answers "whose job, on what, how far, what will it cost, how long has it run";
the change page shows the job's live status (polled from `<pk>/status/`), its loss
curves and, for a compression job, its before/after report as server-rendered SVG, the
newest events and checkpoints, and Cancel / Retry buttons (`<pk>/action/`), each audited.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.contrib import admin, messages
from django.contrib.admin.utils import unquote
from django.core.exceptions import PermissionDenied
from django.db import transaction
from django.db.models import QuerySet
from django.forms.models import BaseInlineFormSet
from django.http import (
    Http404,
    HttpRequest,
    HttpResponse,
    HttpResponseNotAllowed,
    HttpResponseRedirect,
    JsonResponse,
)
from django.urls import URLPattern, path, reverse
from django.utils import timezone
from django.utils.safestring import mark_safe

from controlplane.audit.services import Actor, audit_record
from controlplane.core.charts import bar_chart, line_chart
from controlplane.core.errors import ApiError

from . import selectors, services
from .models import TERMINAL, Job, JobCheckpoint, JobEvent, JobKind, JobStatus

#: Events and checkpoints shown inline on a job's page: the newest ones.
INLINE_LIMIT = 50
RETRYABLE = (JobStatus.FAILED, JobStatus.CANCELLED)


class NewestFormSet(BaseInlineFormSet[Any, Any, Any]):
    """An inline of the newest `INLINE_LIMIT` rows only: a long job has thousands of events."""

    def get_queryset(self) -> QuerySet[Any]:
        if not hasattr(self, "_newest"):
            self._newest = super().get_queryset()[:INLINE_LIMIT]
        return self._newest


class JobEventInline(admin.TabularInline[JobEvent, Job]):
    model = JobEvent
    formset = NewestFormSet
    fields = ("created_at", "level", "type", "message", "attempt")
    readonly_fields = fields
    extra = 0
    can_delete = False
    max_num = 0
    verbose_name_plural = f"events (newest {INLINE_LIMIT})"

    def get_queryset(self, request: HttpRequest) -> QuerySet[JobEvent]:
        return JobEvent.objects.dangerously_unscoped().order_by("-created_at", "-id")


class JobCheckpointInline(admin.TabularInline[JobCheckpoint, Job]):
    model = JobCheckpoint
    formset = NewestFormSet
    fields = ("step_number", "metrics", "fine_tuned_model_checkpoint", "created_at")
    readonly_fields = fields
    extra = 0
    can_delete = False
    max_num = 0
    verbose_name_plural = f"checkpoints (newest {INLINE_LIMIT})"

    def get_queryset(self, request: HttpRequest) -> QuerySet[JobCheckpoint]:
        return JobCheckpoint.objects.dangerously_unscoped().order_by("-step_number")


class QueueFilter(admin.SimpleListFilter):
    """The broker queue a job runs on (it follows from the job's kind)."""

    title = "queue"
    parameter_name = "queue"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [(queue, queue) for queue in selectors.QUEUE_OF_KIND.values()]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        kinds = [kind for kind, queue in selectors.QUEUE_OF_KIND.items() if queue == self.value()]
        return queryset.filter(kind__in=kinds) if self.value() else queryset


def _duration(delta: timedelta) -> str:
    seconds = int(delta.total_seconds())
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes:02d}m"
    return f"{minutes}m {seconds:02d}s" if minutes else f"{seconds}s"


@admin.register(Job)
class JobAdmin(admin.ModelAdmin[Job]):
    list_display = (
        "id",
        "organization_name",
        "kind",
        "model_name",
        "method",
        "status",
        "progress",
        "estimated_price",
        "created_at",
        "duration",
    )
    list_filter = ("status", "kind", "method", QueueFilter, "task", "created_at")
    list_select_related = ("organization",)
    search_fields = (
        "id",
        "organization__name",
        "organization__id",
        "suffix",
        "base_model__id",
        "source_model__id",
        "fine_tuned_model",
        "engagement_id",
    )
    ordering = ("-created_at",)
    readonly_fields = [f.name for f in Job._meta.fields]
    inlines = [JobCheckpointInline, JobEventInline]
    actions = ["cancel_jobs"]
    change_form_template = "admin/jobs/job/change_form.html"

    def get_queryset(self, request: HttpRequest) -> QuerySet[Job]:
        return Job.objects.dangerously_unscoped().select_related("organization")

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    # -- list columns --------------------------------------------------------------------

    @admin.display(description="organization", ordering="organization__name")
    def organization_name(self, job: Job) -> str:
        return job.organization.name

    @admin.display(description="model", ordering="base_model_id")
    def model_name(self, job: Job) -> str:
        """What the job started from: a customer model (compressed), else its base model."""
        return job.source_model_id or job.base_model_id

    @admin.display(description="progress / trained tokens")
    def progress(self, job: Job) -> str:
        if job.trained_tokens is not None:
            return f"{job.trained_tokens:,} tokens"
        if job.total_steps:
            share = 100 * job.current_step // job.total_steps
            return f"step {job.current_step}/{job.total_steps} ({share}%)"
        return "-"

    @admin.display(description="duration")
    def duration(self, job: Job) -> str:
        if job.started_at is None:
            return "-"
        return _duration((job.finished_at or timezone.now()) - job.started_at)

    # -- the change page -----------------------------------------------------------------

    def get_urls(self) -> list[URLPattern]:
        own = [
            path(
                "<path:object_id>/status/",
                self.admin_site.admin_view(self.status_view),
                name="jobs_job_status",
            ),
            path(
                "<path:object_id>/action/",
                self.admin_site.admin_view(self.action_view),
                name="jobs_job_action",
            ),
        ]
        return own + super().get_urls()  # before the catch-all `<path:object_id>/`

    def _job(self, request: HttpRequest, object_id: str) -> Job:
        job = self.get_object(request, unquote(object_id))
        if job is None:
            raise Http404(f"No job with id '{object_id}'.")
        if not self.has_view_permission(request, job):
            raise PermissionDenied
        return job

    def change_view(
        self,
        request: HttpRequest,
        object_id: str,
        form_url: str = "",
        extra_context: dict[str, Any] | None = None,
    ) -> HttpResponse:
        job = self.get_object(request, unquote(object_id))
        context = dict(extra_context or {})
        if job is not None and self.has_view_permission(request, job):
            context.update(self._page(request, job))
        return super().change_view(request, object_id, form_url, context)

    def _page(self, request: HttpRequest, job: Job) -> dict[str, Any]:
        curves = selectors.loss_curves(job)
        context: dict[str, Any] = {
            "job": job,
            "job_queue": selectors.queue_of(job),
            "job_terminal": job.status in TERMINAL,
            "status_url": reverse("admin:jobs_job_status", args=[job.pk]),
            "action_url": reverse("admin:jobs_job_action", args=[job.pk]),
            "can_act": self.has_change_permission(request, job),
            "can_cancel": job.status not in TERMINAL,
            "can_retry": job.status in RETRYABLE,
            "curve_points": {s.name: len(s.points) for s in curves},
            # Built from the job's own numbers; every text in it is escaped by charts.
            "loss_chart": mark_safe(  # noqa: S308
                line_chart(
                    curves,
                    title="Loss by step",
                    x_label="step",
                    y_label="loss",
                    element_id="loss-chart",
                )
            ),
            # Nothing to save: every field is read-only; the page acts through its buttons.
            "show_save": False,
            "show_save_and_continue": False,
            "show_save_and_add_another": False,
            "show_delete": False,
        }
        if job.kind == JobKind.COMPRESSION:
            report = job.report if isinstance(job.report, dict) else {}
            context["report_chart"] = mark_safe(  # noqa: S308
                bar_chart(
                    selectors.report_groups(report) if report else [],
                    series_names=["Before (source)", "After (result)"],
                    title=f"Compression report ({job.method}): before and after",
                    element_id="report-chart",
                )
            )
        return context

    def status_view(self, request: HttpRequest, object_id: str) -> JsonResponse:
        # admin_view marks it never cached: each poll reads the job anew.
        return JsonResponse(selectors.job_status(self._job(request, object_id)))

    def action_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        """Cancel or retry one job (`job_action`), audited in the same transaction."""
        if request.method != "POST":
            return HttpResponseNotAllowed(["POST"])
        job = self._job(request, object_id)
        if not self.has_change_permission(request, job):
            raise PermissionDenied
        action = request.POST.get("job_action")
        change = reverse("admin:jobs_job_change", args=[job.pk])
        try:
            with transaction.atomic():
                if action == "cancel":
                    services.job_cancel(job=job)
                    _audit(request, job, "cancelled", {})
                    self.message_user(request, f"Cancelled {job.pk}.", messages.SUCCESS)
                elif action == "retry":
                    retry = services.job_retry(job=job)
                    _audit(request, job, "retried", {"retry": retry.pk})
                    self.message_user(
                        request, f"Retried {job.pk} as a new job, {retry.pk}.", messages.SUCCESS
                    )
                    change = reverse("admin:jobs_job_change", args=[retry.pk])
                else:
                    self.message_user(
                        request, f"Unknown action {action!r}: use cancel or retry.", messages.ERROR
                    )
        except ApiError as error:
            self.message_user(request, f"Refused: {error.detail}", messages.ERROR)
        return HttpResponseRedirect(change)

    @admin.action(description="Cancel selected jobs")
    def cancel_jobs(self, request: HttpRequest, queryset: QuerySet[Job]) -> None:
        done = 0
        for job in queryset:
            try:
                with transaction.atomic():
                    services.job_cancel(job=job)
                    _audit(request, job, "cancelled", {})
            except ApiError:
                continue
            done += 1
        self.message_user(request, f"Cancelled {done} job(s).", messages.SUCCESS)


def _audit(request: HttpRequest, job: Job, verb: str, details: dict[str, Any]) -> None:
    audit_record(
        organization=job.organization_id,
        actor=Actor.from_request(request),
        action=f"admin.{job.kind}_job.{verb}",
        target=job,
        target_type=f"{job.kind}_job",
        details=details,
    )
