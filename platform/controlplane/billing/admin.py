"""Staff views of billing: plans and prices are data; the ledger and invoices are read-only."""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.http import HttpRequest

from .credits import credit_grant
from .models import CreditGrant, Invoice, InvoiceLine, LedgerEntry, Plan, PriceBookEntry


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
        "active",
    )
    list_filter = ("active",)


@admin.register(PriceBookEntry)
class PriceBookEntryAdmin(admin.ModelAdmin[PriceBookEntry]):
    """Prices are added, never edited: a change is a new row from a later time."""

    list_display = ("meter", "model", "unit_price", "unit", "effective_from", "effective_to")
    list_filter = ("meter",)
    search_fields = ("model",)

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> Any:
        if obj is None:
            return ()
        # Only closing an open row is allowed (setting effective_to).
        return tuple(f.name for f in PriceBookEntry._meta.fields if f.name != "effective_to")

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


class ReadOnly(admin.ModelAdmin[Any]):
    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(LedgerEntry)
class LedgerEntryAdmin(ReadOnly):
    list_display = ("occurred_at", "organization", "meter", "model", "quantity", "source")
    list_filter = ("meter", "source")
    search_fields = ("idempotency_key", "reference", "organization__id")
    date_hierarchy = "occurred_at"
    show_full_result_count = False


class InvoiceLineInline(admin.TabularInline[InvoiceLine, Invoice]):
    model = InvoiceLine
    extra = 0
    can_delete = False
    readonly_fields = ("kind", "description", "meter", "model", "quantity", "unit_price", "amount")
    fields = readonly_fields


@admin.register(Invoice)
class InvoiceAdmin(ReadOnly):
    list_display = ("id", "organization", "period_start", "total", "credits_applied", "status")
    list_filter = ("status",)
    inlines = (InvoiceLineInline,)


@admin.register(CreditGrant)
class CreditGrantAdmin(admin.ModelAdmin[CreditGrant]):
    """Staff grant credit here; grants are never edited (grant a correction instead)."""

    list_display = ("created_at", "organization", "amount", "source", "note", "granted_by")
    fields = ("organization", "amount", "note")
    raw_id_fields = ("organization",)

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return obj is None

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def save_model(self, request: HttpRequest, obj: CreditGrant, form: Any, change: bool) -> None:
        granted = credit_grant(
            organization=obj.organization_id,
            amount=obj.amount,
            source="staff",
            idempotency_key=f"staff:{obj.pk}",
            note=obj.note,
            granted_by_id=getattr(request.user, "pk", None),
        )
        obj.pk = granted.pk
