"""Staff views of per-key limits, budgets and budget alerts.

Writes go through the same services as the API (`key_limits_set`, `budget_create`,
`budget_update`, `budget_delete`): validated the same way, audited, and the caches of
this process cleared at once.
"""

from __future__ import annotations

from typing import Any

from django import forms
from django.contrib import admin
from django.db import transaction
from django.db.models import QuerySet
from django.http import HttpRequest

from controlplane.audit.admin import ReadOnlyAdmin
from controlplane.audit.services import Actor

from . import services
from .models import Budget, BudgetAlert, BudgetPeriod, KeyLimits


class KeyLimitsForm(forms.ModelForm[KeyLimits]):
    class Meta:
        model = KeyLimits
        fields = ("api_key", "requests_per_minute", "tokens_per_minute", "requests_per_day")


@admin.register(KeyLimits)
class KeyLimitsAdmin(admin.ModelAdmin[KeyLimits]):
    form = KeyLimitsForm
    list_display = (
        "api_key",
        "organization",
        "requests_per_minute",
        "tokens_per_minute",
        "requests_per_day",
        "updated_at",
    )
    search_fields = ("api_key__id", "api_key__name", "organization__id", "organization__name")
    list_select_related = ("api_key", "organization")
    raw_id_fields = ("api_key",)

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> Any:
        return ("api_key",) if obj is not None else ()

    @transaction.atomic
    def save_model(self, request: HttpRequest, obj: KeyLimits, form: Any, change: bool) -> None:
        key = obj.api_key if change else form.cleaned_data["api_key"]
        saved = services.key_limits_set(
            api_key=key,
            values={f: form.cleaned_data.get(f) for f in services.LIMIT_FIELDS},
            actor=Actor.from_request(request),
            principal=None,
        )
        obj.pk, obj.organization_id = saved.pk, saved.organization_id


class BudgetForm(forms.ModelForm[Budget]):
    class Meta:
        model = Budget
        fields = (
            "organization",
            "api_key",
            "name",
            "amount",
            "kind",
            "period",
            "period_days",
            "anchor",
            "alert_thresholds",
        )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if "anchor" in self.fields:
            self.fields["anchor"].required = False  # default: now (budget_create)

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        key, org = data.get("api_key"), data.get("organization") or self.instance.organization
        if key is not None and org is not None and key.organization_id != org.pk:
            self.add_error("api_key", "This key belongs to another organization.")
        if data.get("period") == BudgetPeriod.DAYS and not data.get("period_days"):
            self.add_error("period_days", "A budget with period 'days' needs its length.")
        return data


@admin.register(Budget)
class BudgetAdmin(admin.ModelAdmin[Budget]):
    form = BudgetForm
    list_display = ("id", "organization", "name", "api_key", "amount", "kind", "period")
    list_filter = ("kind", "period")
    search_fields = ("id", "name", "organization__id", "organization__name", "api_key__id")
    list_select_related = ("organization", "api_key")
    raw_id_fields = ("api_key", "organization")

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> Any:
        # A budget stays with its organization and key; the rest is what the API may change.
        return ("organization", "api_key", "period", "period_days", "anchor") if obj else ()

    @transaction.atomic
    def save_model(self, request: HttpRequest, obj: Budget, form: Any, change: bool) -> None:
        actor = Actor.from_request(request)
        data = form.cleaned_data
        if change:
            editable = ("name", "amount", "kind", "alert_thresholds")
            changes = {name: data[name] for name in form.changed_data if name in editable}
            saved = services.budget_update(budget=obj, changes=changes, actor=actor)
        else:
            saved = services.budget_create(
                organization=data["organization"],
                api_key=data.get("api_key"),
                name=data.get("name") or "",
                amount=data["amount"],
                kind=data["kind"],
                period=data["period"],
                period_days=data.get("period_days"),
                anchor=data.get("anchor"),
                alert_thresholds=list(data.get("alert_thresholds") or []),
                actor=actor,
            )
        obj.pk = saved.pk

    def delete_model(self, request: HttpRequest, obj: Budget) -> None:
        services.budget_delete(budget=obj, actor=Actor.from_request(request))

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[Budget]) -> None:
        for budget in queryset:
            services.budget_delete(budget=budget, actor=Actor.from_request(request))


@admin.register(BudgetAlert)
class BudgetAlertAdmin(ReadOnlyAdmin):
    list_display = ("budget", "organization", "period_start", "threshold", "spent", "created_at")
    list_filter = ("threshold", "created_at")
    search_fields = ("budget__id", "budget__name", "organization__id", "organization__name")
    list_select_related = ("budget", "organization")
