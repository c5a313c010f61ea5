"""Staff view of batches: whose, which endpoint, how far, and a Cancel button.

The list reads the batch's own counters (no query per row); a batch's page counts its
lines by status (pending, succeeded, failed, sent more than once), links its files, and
cancels it (`<pk>/cancel/`, POST, audited) as the API's cancel does.
"""

from __future__ import annotations

from typing import Any

from django.contrib import admin, messages
from django.contrib.admin.utils import quote, unquote
from django.core.exceptions import PermissionDenied
from django.db import transaction
from django.db.models import Count, Q, QuerySet, Sum
from django.http import (
    Http404,
    HttpRequest,
    HttpResponse,
    HttpResponseNotAllowed,
    HttpResponseRedirect,
)
from django.urls import URLPattern, path, reverse
from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString

from controlplane.audit.admin import staff_audit
from controlplane.core.errors import ApiError

from . import services
from .models import Batch, BatchLine, BatchStatus, LineStatus


def _cancellable(batch: Batch) -> bool:
    return batch.status in (BatchStatus.VALIDATING, BatchStatus.IN_PROGRESS)


@admin.register(Batch)
class BatchAdmin(admin.ModelAdmin[Batch]):
    list_display = (
        "id",
        "organization_name",
        "endpoint",
        "status",
        "counts",
        "created_at",
        "expires_at",
    )
    list_filter = ("status", "endpoint", "created_at")
    list_select_related = ("organization",)
    search_fields = ("id", "organization__name", "organization__id", "input_file__id")
    ordering = ("-created_at",)
    readonly_fields = ["cancel_button", "lines", "files", *(f.name for f in Batch._meta.fields)]
    actions = ["cancel_batches"]

    def get_queryset(self, request: HttpRequest) -> QuerySet[Batch]:
        return Batch.objects.dangerously_unscoped().select_related("organization")

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    # -- list columns --------------------------------------------------------------------

    @admin.display(description="organization", ordering="organization__name")
    def organization_name(self, batch: Batch) -> str:
        return batch.organization.name

    @admin.display(description="completed / failed / total")
    def counts(self, batch: Batch) -> str:
        return f"{batch.completed:,} / {batch.failed:,} / {batch.total:,}"

    # -- the change page -----------------------------------------------------------------

    @admin.display(description="lines")
    def lines(self, batch: Batch) -> SafeString:
        counts = BatchLine.objects.filter(batch=batch).aggregate(
            pending=Count("pk", filter=Q(status=LineStatus.PENDING)),
            succeeded=Count("pk", filter=Q(status=LineStatus.SUCCEEDED)),
            failed=Count("pk", filter=Q(status=LineStatus.FAILED)),
            resent=Count("pk", filter=Q(attempts__gt=1)),
            prompt_tokens=Sum("prompt_tokens", default=0),
            completion_tokens=Sum("completion_tokens", default=0),
        )
        labels = {
            "pending": "pending",
            "succeeded": "succeeded",
            "failed": "failed",
            "resent": "sent more than once",
            "prompt_tokens": "prompt tokens",
            "completion_tokens": "completion tokens",
        }
        rows = format_html_join(
            "",
            '<tr><th>{}</th><td id="lines-{}">{}</td></tr>',
            ((labels[k], k.replace("_", "-"), f"{v:,}") for k, v in counts.items()),
        )
        return format_html('<table id="batch-lines">{}</table>', rows)

    @admin.display(description="files")
    def files(self, batch: Batch) -> SafeString:
        links = []
        for label, file_id in (
            ("input", batch.input_file_id),
            ("output", batch.output_file_id),
            ("errors", batch.error_file_id),
        ):
            if file_id:
                url = reverse("admin:datasets_file_change", args=[quote(file_id)])
                links.append((label, url, file_id))
        if not links:
            return format_html("{}", "-")
        return format_html_join(" · ", '{}: <a href="{}">{}</a>', links)

    @admin.display(description="cancel")
    def cancel_button(self, batch: Batch) -> SafeString:
        if not _cancellable(batch):
            return format_html("{}", f"Not cancellable ({batch.status}).")
        url = reverse("admin:batches_batch_cancel", args=[quote(batch.pk)])
        # Inside the change form: posts it (and its CSRF token) to the cancel view.
        return format_html(
            '<button type="submit" id="cancel-batch" class="button" formaction="{}" '
            'formmethod="post">Cancel this batch</button>',
            url,
        )

    def get_urls(self) -> list[URLPattern]:
        own = [
            path(
                "<path:object_id>/cancel/",
                self.admin_site.admin_view(self.cancel_view),
                name="batches_batch_cancel",
            ),
        ]
        return own + super().get_urls()  # before the catch-all `<path:object_id>/`

    def change_view(
        self,
        request: HttpRequest,
        object_id: str,
        form_url: str = "",
        extra_context: dict[str, Any] | None = None,
    ) -> HttpResponse:
        context = dict(extra_context or {})
        # Nothing to save: every field is read-only; the page acts through its button.
        context.update(
            show_save=False,
            show_save_and_continue=False,
            show_save_and_add_another=False,
            show_delete=False,
        )
        return super().change_view(request, object_id, form_url, context)

    def cancel_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        if request.method != "POST":
            return HttpResponseNotAllowed(["POST"])
        batch = self.get_object(request, unquote(object_id))
        if batch is None:
            raise Http404(f"No batch with id '{unquote(object_id)}'.")
        if not self.has_change_permission(request, batch):
            raise PermissionDenied
        if self._cancel(request, batch):
            self.message_user(request, f"Cancelling {batch.pk}.", messages.SUCCESS)
        return HttpResponseRedirect(reverse("admin:batches_batch_change", args=[quote(batch.pk)]))

    def _cancel(self, request: HttpRequest, batch: Batch) -> bool:
        try:
            with transaction.atomic():
                services.batch_cancel(batch=batch)
                staff_audit(
                    request,
                    organization=batch.organization_id,
                    action="admin.batch.cancelled",
                    target=batch,
                    target_type="batch",
                )
        except ApiError as error:
            self.message_user(request, f"Refused: {error.detail}", messages.ERROR)
            return False
        return True

    @admin.action(description="Cancel selected batches")
    def cancel_batches(self, request: HttpRequest, queryset: QuerySet[Batch]) -> None:
        done = 0
        for batch in queryset:
            if not _cancellable(batch):
                continue
            done += self._cancel(request, batch)
        self.message_user(request, f"Cancelling {done} batch(es).", messages.SUCCESS)
