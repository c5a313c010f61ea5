"""Staff views of the Stripe mirror. Read-only: Stripe is the source of truth, and a hand edit
here would diverge from it (change things in Stripe; its webhooks update these rows)."""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.http import HttpRequest

from .models import Dunning, StripeCustomer, StripeEvent, StripeInvoice, Subscription


class ReadOnlyAdmin(admin.ModelAdmin[Any]):
    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(StripeCustomer)
class StripeCustomerAdmin(ReadOnlyAdmin):
    list_display = ("stripe_id", "organization", "created_at")
    search_fields = ("stripe_id", "organization__id", "organization__name")
    list_select_related = ("organization",)


@admin.register(Subscription)
class SubscriptionAdmin(ReadOnlyAdmin):
    list_display = (
        "organization",
        "plan",
        "status",
        "current_period_end",
        "cancel_at_period_end",
        "stripe_subscription_id",
        "updated_at",
    )
    list_filter = ("status", "plan", "cancel_at_period_end")
    search_fields = ("stripe_subscription_id", "organization__id", "organization__name")
    list_select_related = ("organization",)


@admin.register(Dunning)
class DunningAdmin(ReadOnlyAdmin):
    list_display = (
        "organization",
        "stripe_invoice_id",
        "amount_due",
        "currency",
        "started_at",
        "grace_ends_at",
        "resolved_at",
    )
    list_filter = ("resolved_at",)
    search_fields = ("stripe_invoice_id", "organization__id", "organization__name")
    list_select_related = ("organization",)


@admin.register(StripeInvoice)
class StripeInvoiceAdmin(ReadOnlyAdmin):
    list_display = ("invoice_id", "stripe_invoice_id", "status", "organization", "updated_at")
    list_filter = ("status",)
    search_fields = ("invoice_id", "stripe_invoice_id", "organization__id")
    list_select_related = ("organization",)


@admin.register(StripeEvent)
class StripeEventAdmin(ReadOnlyAdmin):
    # outcome "failed" (filter on it): applying the event failed for good, `failure` says why;
    # Stripe was answered 200 and will not send it again (see payments.webhooks).
    list_display = ("id", "type", "outcome", "failure", "organization", "created", "received_at")
    list_filter = ("type", "outcome")
    search_fields = ("id", "organization__id", "failure")
    list_select_related = ("organization",)
