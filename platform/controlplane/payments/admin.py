"""Staff views of the Stripe mirror, and the organization admin staff work from.

The Stripe mirror is read-only: Stripe is the source of truth, and a hand edit here would
diverge from it (change things in Stripe; its webhooks update these rows).

The Organization admin is tenancy's, extended here (payments sits above billing and
tenancy in the layers, and its services are the ones these actions call): its standing,
credit balance, plan and subscription on the list; suspend and restore inference
(`access.organization_suspend` / `organization_restore`), grant credit
(`billing.credits.credit_grant`) and change the plan (`billing.plans.plan_change`), each
audited in the organization's log.
"""

from __future__ import annotations

import uuid
from decimal import Decimal
from typing import Any

from django import forms
from django.contrib import admin, messages
from django.db import transaction
from django.db.models import DecimalField, Min, OuterRef, QuerySet, Subquery, Sum
from django.db.models.functions import Coalesce
from django.http import HttpRequest
from django.template.response import TemplateResponse
from django.utils import timezone

from controlplane.audit.admin import ReadOnlyAdmin, action_form, staff_audit
from controlplane.billing.credits import credit_grant
from controlplane.billing.models import (
    CreditGrant,
    CreditSource,
    Invoice,
    Plan,
    PlanAssignment,
)
from controlplane.billing.plans import DEFAULT_PLANS, plan_change
from controlplane.core.errors import ApiError
from controlplane.tenancy import admin as tenancy_admin
from controlplane.tenancy.models import Organization

from . import access
from .models import Dunning, StripeCustomer, StripeEvent, StripeInvoice, Subscription
from .services import LIVE

# --- the organization admin ---------------------------------------------------------------


def _sum(queryset: QuerySet[Any], field: str) -> Coalesce:
    summed = (
        queryset.filter(organization=OuterRef("pk"))
        .order_by()
        .values("organization")
        .annotate(s=Sum(field))
        .values("s")
    )
    money = DecimalField(max_digits=14, decimal_places=2)
    return Coalesce(Subquery(summed, output_field=money), Decimal(0), output_field=money)


class StandingFilter(admin.SimpleListFilter):
    title = "standing"
    parameter_name = "standing"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [
            ("suspended", "suspended"),
            ("grace", "unpaid, in grace period"),
            ("good", "in good standing"),
        ]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        now = timezone.now()
        if self.value() == "suspended":
            return queryset.filter(suspend_at__lte=now)
        if self.value() == "grace":
            return queryset.filter(suspend_at__gt=now)
        if self.value() == "good":
            return queryset.filter(suspend_at__isnull=True)
        return queryset


class PlanAssignmentInline(admin.TabularInline[PlanAssignment, Organization]):
    """The plan history invoicing prorates on (written by plan changes only)."""

    model = PlanAssignment
    extra = 0
    max_num = 0
    can_delete = False
    fields = ("plan", "effective_from", "billed_by", "created_at")
    readonly_fields = fields
    ordering = ("-effective_from",)
    verbose_name_plural = "plan history"

    def get_queryset(self, request: HttpRequest) -> QuerySet[PlanAssignment]:
        return super().get_queryset(request).select_related("plan")


class CreditGrantInline(admin.TabularInline[CreditGrant, Organization]):
    model = CreditGrant
    extra = 0
    max_num = 0
    can_delete = False
    fields = ("created_at", "amount", "source", "note", "granted_by")
    readonly_fields = fields
    ordering = ("-created_at",)

    def get_queryset(self, request: HttpRequest) -> QuerySet[CreditGrant]:
        return super().get_queryset(request).select_related("granted_by")


class SuspendForm(forms.Form):
    reason = forms.CharField(
        max_length=500, help_text="Why (kept in the organization's audit log)."
    )


class CreditForm(forms.Form):
    amount = forms.DecimalField(
        min_value=Decimal("0.01"),
        max_digits=12,
        decimal_places=2,
        help_text="USD of prepaid credit for each selected organization.",
    )
    note = forms.CharField(max_length=500, help_text="Why (shown with the grant).")
    #: One token per rendered form: submitting the same form twice grants once.
    token = forms.CharField(widget=forms.HiddenInput)


class PlanForm(forms.Form):
    plan = forms.ChoiceField()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        plans = list(Plan.objects.filter(active=True).values_list("code", "name"))
        choices = plans or [(code, values["name"]) for code, values in DEFAULT_PLANS.items()]
        self.fields["plan"].choices = choices  # type: ignore[attr-defined]


admin.site.unregister(Organization)


@admin.register(Organization)
class OrganizationAdmin(tenancy_admin.OrganizationAdmin):
    actions = ["suspend", "restore", "grant_credit", "change_plan"]

    def get_list_display(self, request: HttpRequest) -> Any:
        return (
            "name",
            "id",
            "plan",
            "subscription",
            "standing",
            "credit_balance",
            "members",
            "is_customer",
            "is_data_partner",
            "created_at",
        )

    def get_list_filter(self, request: HttpRequest) -> Any:
        return (StandingFilter, *super().get_list_filter(request))

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> Any:
        extra = ("standing", "subscription", "credit_balance")
        return (*super().get_readonly_fields(request, obj), *extra)

    def get_inlines(self, request: HttpRequest, obj: Any) -> Any:
        return [*super().get_inlines(request, obj), PlanAssignmentInline, CreditGrantInline]

    def get_queryset(self, request: HttpRequest) -> QuerySet[Organization]:
        open_dunning = (
            Dunning._plain.filter(organization=OuterRef("pk"), resolved_at__isnull=True)
            .order_by()
            .values("organization")
            .annotate(first=Min("grace_ends_at"))
            .values("first")
        )
        granted = _sum(CreditGrant._plain.all(), "amount")
        applied = _sum(Invoice._plain.all(), "credits_applied")
        subscription = Subscription._plain.filter(organization=OuterRef("pk")).values("status")
        return (
            super()
            .get_queryset(request)
            .annotate(
                suspend_at=Subquery(open_dunning),
                credit=granted - applied,
                subscription_status=Subquery(subscription[:1]),
            )
        )

    @admin.display(description="Standing", ordering="suspend_at")
    def standing(self, obj: Any) -> str:
        if obj.suspend_at is None:
            return "good"
        if obj.suspend_at <= timezone.now():
            return "suspended"
        return f"unpaid, grace until {obj.suspend_at:%Y-%m-%d}"

    @admin.display(description="Credit (USD)", ordering="credit")
    def credit_balance(self, obj: Any) -> Decimal:
        return Decimal(obj.credit).quantize(Decimal("0.01"))

    @admin.display(description="Subscription", ordering="subscription_status")
    def subscription(self, obj: Any) -> str:
        return str(obj.subscription_status or "-")

    def has_grant_credit_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm("billing.add_creditgrant")

    @admin.action(
        description="Suspend inference for selected organizations", permissions=["change"]
    )
    def suspend(
        self, request: HttpRequest, queryset: QuerySet[Organization]
    ) -> TemplateResponse | None:
        form = SuspendForm(request.POST if "apply" in request.POST else None)
        if not form.is_valid():
            return action_form(
                self,
                request,
                queryset,
                form,
                action="suspend",
                title="Suspend inference",
                submit="Suspend",
                intro="Inference requests of these organizations are refused until restored.",
            )
        done = 0
        for org in queryset:
            with transaction.atomic():
                suspension = access.organization_suspend(organization=org)
                if suspension is None:
                    self.message_user(request, f"{org.name} is already suspended.", messages.INFO)
                    continue
                staff_audit(
                    request,
                    organization=org,
                    action="admin.organization.suspended",
                    target=org,
                    details={"reason": form.cleaned_data["reason"], "suspension": suspension},
                )
            done += 1
        self.message_user(request, f"Suspended {done} organization(s).", messages.SUCCESS)
        return None

    @admin.action(
        description="Restore service (lift suspensions and unpaid-invoice blocks)",
        permissions=["change"],
    )
    def restore(self, request: HttpRequest, queryset: QuerySet[Organization]) -> None:
        done = 0
        for org in queryset:
            with transaction.atomic():
                resolved = access.organization_restore(organization=org)
                if not resolved:
                    continue
                staff_audit(
                    request,
                    organization=org,
                    action="admin.organization.restored",
                    target=org,
                    details={"resolved": resolved},
                )
            done += 1
        self.message_user(request, f"Restored {done} organization(s).", messages.SUCCESS)

    @admin.action(
        description="Grant credit to selected organizations", permissions=["grant_credit"]
    )
    def grant_credit(
        self, request: HttpRequest, queryset: QuerySet[Organization]
    ) -> TemplateResponse | None:
        applying = "apply" in request.POST
        form = CreditForm(request.POST if applying else None, initial={"token": uuid.uuid4().hex})
        if not form.is_valid():
            return action_form(
                self,
                request,
                queryset,
                form,
                action="grant_credit",
                title="Grant credit",
                submit="Grant",
                intro="Prepaid credit is drawn down by the next invoices.",
            )
        amount, note = form.cleaned_data["amount"], form.cleaned_data["note"]
        granted = 0
        for org in queryset:
            key = f"staff:{form.cleaned_data['token']}:{org.pk}"
            with transaction.atomic():
                if CreditGrant._plain.filter(idempotency_key=key).exists():
                    continue  # this form was submitted already
                grant = credit_grant(
                    organization=org,
                    amount=amount,
                    source=CreditSource.STAFF,
                    idempotency_key=key,
                    note=note,
                    granted_by_id=str(request.user.pk),
                )
                staff_audit(
                    request,
                    organization=org,
                    action="admin.organization.credit_granted",
                    target=org,
                    details={"amount": str(amount), "note": note, "grant_id": grant.pk},
                )
            granted += 1
        self.message_user(
            request, f"Granted {amount} USD to {granted} organization(s).", messages.SUCCESS
        )
        return None

    @admin.action(description="Change the plan of selected organizations", permissions=["change"])
    def change_plan(
        self, request: HttpRequest, queryset: QuerySet[Organization]
    ) -> TemplateResponse | None:
        form = PlanForm(request.POST if "apply" in request.POST else None)
        if not form.is_valid():
            return action_form(
                self,
                request,
                queryset,
                form,
                action="change_plan",
                title="Change plan",
                submit="Change plan",
                intro="From now on; the month's invoice prorates the plans. An organization "
                "with a Stripe subscription changes plan through it instead.",
            )
        code = form.cleaned_data["plan"]
        changed = 0
        for org in queryset:
            subscription = Subscription._plain.filter(organization=org).first()
            if subscription is not None and subscription.status in LIVE:
                self.message_user(
                    request,
                    f"{org.name} pays its plan by a Stripe subscription ({subscription.status}): "
                    "change the plan through the subscription, not here.",
                    messages.ERROR,
                )
                continue
            before = org.plan
            if before == code:
                continue
            try:
                with transaction.atomic():
                    plan_change(organization=org, plan_code=code)
                    staff_audit(
                        request,
                        organization=org,
                        action="admin.organization.plan_changed",
                        target=org,
                        details={"from": before, "to": code},
                    )
            except ApiError as exc:
                self.message_user(request, f"{org.name}: {exc.detail}", messages.ERROR)
                continue
            changed += 1
        self.message_user(
            request, f"Moved {changed} organization(s) to '{code}'.", messages.SUCCESS
        )
        return None


# --- the Stripe mirror -------------------------------------------------------------------


@admin.register(StripeCustomer)
class StripeCustomerAdmin(ReadOnlyAdmin):
    list_display = ("stripe_id", "organization", "created_at")
    search_fields = ("stripe_id", "organization__id", "organization__name")
    list_filter = ("created_at",)
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
    """Unpaid invoices (and staff suspensions, `staff-suspension:…`): suspend and restore
    from the organization's admin."""

    list_display = (
        "organization",
        "stripe_invoice_id",
        "amount",
        "started_at",
        "grace_ends_at",
        "resolved_at",
    )
    list_filter = (("resolved_at", admin.EmptyFieldListFilter), "started_at")
    search_fields = ("stripe_invoice_id", "organization__id", "organization__name")
    list_select_related = ("organization",)

    @admin.display(description="Amount due", ordering="amount_due")
    def amount(self, obj: Dunning) -> str:
        if not obj.amount_due:
            return "-"
        return f"{obj.amount_due / 100:.2f} {obj.currency.upper()}"


@admin.register(StripeInvoice)
class StripeInvoiceAdmin(ReadOnlyAdmin):
    list_display = ("invoice_id", "stripe_invoice_id", "status", "organization", "updated_at")
    list_filter = ("status", "updated_at")
    search_fields = ("invoice_id", "stripe_invoice_id", "organization__id", "organization__name")
    list_select_related = ("organization",)


@admin.register(StripeEvent)
class StripeEventAdmin(ReadOnlyAdmin):
    # outcome "failed" (filter on it): applying the event failed for good, `failure` says why;
    # Stripe was answered 200 and will not send it again (see payments.webhooks).
    list_display = ("id", "type", "outcome", "failure", "organization", "created", "received_at")
    list_filter = ("type", "outcome", "received_at")
    search_fields = ("id", "organization__id", "organization__name", "failure", "type")
    list_select_related = ("organization",)
    date_hierarchy = "received_at"
    show_full_result_count = False
