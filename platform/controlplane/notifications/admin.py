"""Staff views of webhooks and their delivery log (read-only: customers manage them)."""

from django.contrib import admin

from controlplane.audit.admin import ReadOnlyAdmin

from .models import Webhook, WebhookDelivery, WebhookEvent


@admin.register(Webhook)
class WebhookAdmin(ReadOnlyAdmin):
    list_display = ("id", "organization", "url", "enabled", "created_at")
    list_filter = ("enabled",)
    search_fields = ("id", "url", "organization__id")
    exclude = ("secret",)


@admin.register(WebhookEvent)
class WebhookEventAdmin(ReadOnlyAdmin):
    list_display = ("id", "organization", "type", "created_at")
    list_filter = ("type",)
    search_fields = ("id", "key")


@admin.register(WebhookDelivery)
class WebhookDeliveryAdmin(ReadOnlyAdmin):
    list_display = ("id", "webhook", "event", "attempt", "outcome", "status_code", "created_at")
    list_filter = ("outcome",)
    search_fields = ("id", "webhook__id", "event__id")
