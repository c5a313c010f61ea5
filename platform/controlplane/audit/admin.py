"""The audit log's admin, and the pieces every app's admin shares.

- `AuditedAdmin`: form saves and deletions are written to the organization's audit log.
- `staff_audit`: one audit entry for a staff action (admin actions call it, in the
  transaction of the change).
- `ReadOnlyAdmin`: rows staff read and never write (ledgers, mirrors of Stripe).
- `action_form`: the intermediate page of an action that needs input (an amount, a plan),
  rendered with `admin/audit/action_form.html`.
- `report_html`: a stored JSON report (validation, preprocessing) as nested tables.
- `count_of`: a per-row count as a correlated subquery, so a changelist column costs no
  query per row.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from django import forms
from django.contrib import admin
from django.contrib.admin import helpers
from django.db import models, transaction
from django.db.models import Count, OuterRef, QuerySet, Subquery
from django.db.models.functions import Coalesce
from django.forms import ModelForm
from django.http import HttpRequest
from django.template.response import TemplateResponse
from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString, mark_safe

from .models import AuditLog
from .services import Actor, audit_record


def staff_audit(
    request: HttpRequest,
    *,
    organization: models.Model | str,
    action: str,
    target: models.Model | None = None,
    target_type: str = "",
    details: dict[str, Any] | None = None,
) -> AuditLog:
    """Record what a staff user did through the admin (actor: the logged-in staff user)."""
    return audit_record(
        organization=organization,
        actor=Actor.from_request(request),
        action=action,
        target=target,
        target_type=target_type,
        details=details,
    )


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


class ReadOnlyAdmin(admin.ModelAdmin[Any]):
    """Staff read these rows (with the view permission) and never add, change or delete them."""

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


def action_form(
    modeladmin: admin.ModelAdmin[Any],
    request: HttpRequest,
    queryset: QuerySet[Any],
    form: forms.Form,
    *,
    action: str,
    title: str,
    submit: str,
    intro: str = "",
) -> TemplateResponse:
    """The page an action shows to ask for its input; it posts back to the changelist with
    the same action and selection, plus `apply` (the action then reads its form)."""
    opts = modeladmin.model._meta
    context = {
        **modeladmin.admin_site.each_context(request),
        "title": title,
        "intro": intro,
        "opts": opts,
        "app_label": opts.app_label,
        "queryset": queryset,
        "form": form,
        "action": action,
        "submit": submit,
        "action_checkbox_name": helpers.ACTION_CHECKBOX_NAME,
    }
    return TemplateResponse(request, "admin/audit/action_form.html", context)


def count_of(queryset: QuerySet[Any], field: str) -> Coalesce:
    """The number of rows of `queryset` whose `field` is the outer row's pk (0 when none)."""
    counted = (
        queryset.filter(**{field: OuterRef("pk")})
        .order_by()
        .values(field)
        .annotate(n=Count("*"))
        .values("n")
    )
    return Coalesce(Subquery(counted), 0)


def _scalar(value: Any) -> SafeString:
    if value is None or value == "":
        return mark_safe("&mdash;")
    if isinstance(value, bool):
        return format_html("{}", "yes" if value else "no")
    return format_html("{}", value)


def report_html(value: Any) -> SafeString:
    """A JSON report as nested tables: a mapping is a two-column table, a list of mappings
    a table with one column per key, a list of scalars one comma-separated line."""
    if isinstance(value, Mapping):
        if not value:
            return _scalar(None)
        rows = format_html_join(
            "", "<tr><th>{}</th><td>{}</td></tr>", ((k, report_html(v)) for k, v in value.items())
        )
        return format_html('<table class="report">{}</table>', rows)
    if isinstance(value, Sequence) and not isinstance(value, str):
        if not value:
            return _scalar(None)
        if all(isinstance(item, Mapping) for item in value):
            keys: list[str] = []
            for item in value:
                keys.extend(k for k in item if k not in keys)
            head = format_html_join("", "<th>{}</th>", ((k,) for k in keys))
            body = format_html_join(
                "",
                "<tr>{}</tr>",
                (
                    (format_html_join("", "<td>{}</td>", ((report_html(i.get(k)),) for k in keys)),)
                    for i in value
                ),
            )
            return format_html(
                '<table class="report"><thead><tr>{}</tr></thead><tbody>{}</tbody></table>',
                head,
                body,
            )
        return format_html_join(", ", "{}", ((report_html(item),) for item in value))
    return _scalar(value)


@admin.register(AuditLog)
class AuditLogAdmin(ReadOnlyAdmin):
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
    list_filter = ("actor_type", "target_type", "created_at", "action")
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
    # The log only grows: counting all of it on every page is the slow part.
    show_full_result_count = False
    readonly_fields = ("details_table",)

    @admin.display(description="Details")
    def details_table(self, obj: AuditLog) -> SafeString:
        return report_html(obj.details)
