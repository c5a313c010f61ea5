from django.contrib import admin

from .models import Budget, BudgetAlert, KeyLimits


@admin.register(KeyLimits)
class KeyLimitsAdmin(admin.ModelAdmin[KeyLimits]):
    list_display = (
        "api_key",
        "organization",
        "requests_per_minute",
        "tokens_per_minute",
        "requests_per_day",
    )
    search_fields = ("api_key__id", "organization__id")
    raw_id_fields = ("api_key", "organization")


@admin.register(Budget)
class BudgetAdmin(admin.ModelAdmin[Budget]):
    list_display = ("id", "organization", "name", "api_key", "amount", "kind", "period")
    list_filter = ("kind", "period")
    search_fields = ("id", "name", "organization__id")
    raw_id_fields = ("api_key", "organization")


@admin.register(BudgetAlert)
class BudgetAlertAdmin(admin.ModelAdmin[BudgetAlert]):
    list_display = ("budget", "organization", "period_start", "threshold", "spent", "created_at")
    readonly_fields = ("budget", "organization", "period_start", "threshold", "spent")
