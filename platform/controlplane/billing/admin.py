"""Staff views of billing: plans and prices are data; the ledger and invoices are read-only.

The ledger is append-only (the model, its queryset and a database trigger refuse UPDATE
and DELETE): its admin has no add, change or delete, only the view. Credit is granted from
the organization's admin (an action, audited) or here (the add form, audited too).
"""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.db import transaction
from django.db.models import Count, OuterRef, QuerySet, Subquery
from django.db.models.functions import Coalesce
from django.http import HttpRequest

from controlplane.audit.admin import ReadOnlyAdmin, count_of, staff_audit
from controlplane.tenancy.models import Organization

from .credits import credit_grant
from .models import (
    CreditGrant,
    Invoice,
    InvoiceLine,
    LedgerEntry,
    Plan,
    PlanAssignment,
    PriceBookEntry,
)


@admin.register(Plan)
class PlanAdmin(admin.ModelAdmin[Plan]):
    list_display = (
        "code",
        "name",
        "monthly_price",
        "included_amount",
        "requests_per_minute",
        "tokens_per_minute",
        "requests_per_day",
        "concurrent_fine_tuning_jobs",
        "organizations",
        "active",
    )
    list_filter = ("active",)
    search_fields = ("code", "name")

    def get_queryset(self, request: HttpRequest) -> QuerySet[Plan]:
        # Organization.plan is a code, not a foreign key: counted by a correlated subquery.
        on_plan = (
            Organization.objects.filter(plan=OuterRef("code"))
            .order_by()
            .values("plan")
            .annotate(n=Count("*"))
            .values("n")
        )
        return super().get_queryset(request).annotate(org_count=Coalesce(Subquery(on_plan), 0))

    @admin.display(description="Organizations on it", ordering="org_count")
    def organizations(self, obj: Any) -> int:
        return int(obj.org_count)


@admin.register(PriceBookEntry)
class PriceBookEntryAdmin(admin.ModelAdmin[PriceBookEntry]):
    """Prices are added, never edited: a change is a new row from a later time."""

    list_display = (
        "meter",
        "model",
        "unit_price",
        "unit",
        "per_units",
        "effective_from",
        "effective_to",
    )
    list_filter = ("meter", ("effective_to", admin.EmptyFieldListFilter), "effective_from")
    search_fields = ("model",)

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> Any:
        if obj is None:
            return ()
        # Only closing an open row is allowed (setting effective_to).
        return tuple(f.name for f in PriceBookEntry._meta.fields if f.name != "effective_to")

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


def _has_field(model: type[Any], name: str) -> bool:
    return any(f.name == name for f in model._meta.get_fields())


@admin.register(LedgerEntry)
class LedgerEntryAdmin(ReadOnlyAdmin):
    """Append-only: staff read it; a correction is a new entry written by code, never an edit."""

    list_display = (
        "occurred_at",
        "organization",
        "meter",
        "model",
        "quantity",
        "source",
        "reference",
    )
    list_filter = ("meter", "source", "occurred_at")
    search_fields = (
        "idempotency_key",
        "reference",
        "model",
        "organization__id",
        "organization__name",
    )
    list_select_related = ("organization",)
    date_hierarchy = "occurred_at"
    show_full_result_count = False

    # Entries an engagement's jobs billed say so (the field comes with engagements).
    def get_list_display(self, request: HttpRequest) -> Any:
        if _has_field(LedgerEntry, "engagement_id"):
            return (*self.list_display, "engagement_id")
        return self.list_display

    def get_list_filter(self, request: HttpRequest) -> Any:
        if _has_field(LedgerEntry, "engagement_id"):
            return (*self.list_filter, ("engagement_id", admin.EmptyFieldListFilter))
        return self.list_filter


class InvoiceLineInline(admin.TabularInline[InvoiceLine, Invoice]):
    model = InvoiceLine
    extra = 0
    max_num = 0
    can_delete = False
    readonly_fields = ("kind", "description", "meter", "model", "quantity", "unit_price", "amount")
    fields = readonly_fields


@admin.register(Invoice)
class InvoiceAdmin(ReadOnlyAdmin):
    list_display = (
        "id",
        "organization",
        "period_start",
        "subtotal",
        "credits_applied",
        "total",
        "currency",
        "status",
        "lines",
        "stripe_invoice_id",
        "pushed_at",
    )
    list_filter = ("status", "period_start", ("pushed_at", admin.EmptyFieldListFilter))
    search_fields = ("id", "stripe_invoice_id", "organization__id", "organization__name")
    list_select_related = ("organization",)
    date_hierarchy = "period_start"
    inlines = (InvoiceLineInline,)

    def get_queryset(self, request: HttpRequest) -> QuerySet[Invoice]:
        queryset: QuerySet[Invoice] = super().get_queryset(request)
        return queryset.annotate(line_count=count_of(InvoiceLine._plain.all(), "invoice"))

    @admin.display(description="Lines", ordering="line_count")
    def lines(self, obj: Any) -> int:
        return int(obj.line_count)


@admin.register(PlanAssignment)
class PlanAssignmentAdmin(ReadOnlyAdmin):
    """Who was on which plan from when (proration's input); written by plan changes only."""

    list_display = ("organization", "plan", "effective_from", "billed_by", "created_at")
    list_filter = ("plan", "billed_by", "effective_from")
    search_fields = ("organization__id", "organization__name")
    list_select_related = ("organization", "plan")


@admin.register(CreditGrant)
class CreditGrantAdmin(admin.ModelAdmin[CreditGrant]):
    """Staff grant credit here; grants are never edited (grant a correction instead)."""

    list_display = ("created_at", "organization", "amount", "source", "note", "granted_by")
    list_filter = ("source", "created_at")
    search_fields = ("id", "note", "organization__id", "organization__name", "granted_by__email")
    list_select_related = ("organization", "granted_by")
    date_hierarchy = "created_at"
    fields = ("organization", "amount", "note")
    raw_id_fields = ("organization",)

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return obj is None and super().has_change_permission(request, obj)

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    @transaction.atomic
    def save_model(self, request: HttpRequest, obj: CreditGrant, form: Any, change: bool) -> None:
        granted = credit_grant(
            organization=obj.organization_id,
            amount=obj.amount,
            source="staff",
            idempotency_key=f"staff:{obj.pk}",
            note=obj.note,
            granted_by_id=getattr(request.user, "pk", None),
        )
        staff_audit(
            request,
            organization=obj.organization_id,
            action="admin.organization.credit_granted",
            target_type="credit_grant",
            details={"amount": str(granted.amount), "note": granted.note, "grant_id": granted.pk},
        )
        obj.pk = granted.pk
