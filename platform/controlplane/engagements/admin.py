"""Staff run engagements from the admin: the pipeline, jobs, deliveries and milestone bills.

The list answers "whose, what, where in the pipeline, who runs it, how much of the budget
is used, what is due next" in one query. The change page shows, above the form, the
status with one button per allowed move (`<pk>/transition/`), the budget, links to launch
a job (`<pk>/launch/`) and deliver a model (`<pk>/deliver/`), and the milestones with a
Bill button each (`<pk>/bill/`). Each action needs its own permission (Meta.permissions)
besides view access, goes through `services` (which audits it) and reports back as a
Django message.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from django import forms
from django.contrib import admin, messages
from django.contrib.admin.utils import quote, unquote
from django.core.exceptions import PermissionDenied, ValidationError
from django.db.models import F, Q, QuerySet
from django.forms.models import BaseInlineFormSet
from django.http import (
    Http404,
    HttpRequest,
    HttpResponse,
    HttpResponseNotAllowed,
    HttpResponseRedirect,
)
from django.template.response import TemplateResponse
from django.urls import URLPattern, path, reverse
from rest_framework.exceptions import APIException

from controlplane.audit.services import Actor
from controlplane.core.errors import error_parts
from controlplane.datasets.models import File, FileStatus
from controlplane.jobs.models import JobKind

from . import selectors, services
from .estimates import Estimate
from .models import Engagement, EngagementEvent, Milestone, MilestoneStatus

PERMISSIONS = {
    "transition": "engagements.move_engagement",
    "launch": "engagements.launch_job",
    "deliver": "engagements.deliver_model",
    "bill": "engagements.bill_milestone",
}


def _message(exc: APIException) -> str:
    """An API error's message as the API would say it (validation errors name the field)."""
    return str(error_parts(exc)[1]["error"]["message"])


# --- inlines --------------------------------------------------------------------------------


class MilestoneForm(forms.ModelForm[Milestone]):
    """Staff set a milestone pending or accepted; billing alone makes it billed, and a billed
    milestone is no longer edited."""

    status = forms.ChoiceField(
        choices=[(s.value, s.label) for s in MilestoneStatus if s != MilestoneStatus.BILLED],
        initial=MilestoneStatus.PENDING,
    )

    class Meta:
        model = Milestone
        fields = ("title", "due_date", "amount", "status", "acceptance_notes")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.instance.pk and self.instance.status == MilestoneStatus.BILLED:
            status = self.fields["status"]
            assert isinstance(status, forms.ChoiceField)
            status.choices = MilestoneStatus.choices
            for field in self.fields.values():
                field.disabled = True


class MilestoneFormSet(BaseInlineFormSet[Milestone, Engagement, MilestoneForm]):
    def clean(self) -> None:
        super().clean()
        for form in self.deleted_forms:
            if form.instance.pk and form.instance.status == MilestoneStatus.BILLED:
                raise ValidationError(
                    f"The milestone '{form.instance.title}' is billed: it cannot be deleted."
                )


class MilestoneInline(admin.TabularInline[Milestone, Engagement]):
    model = Milestone
    form = MilestoneForm
    formset = MilestoneFormSet  # type: ignore[assignment]
    fields = ("title", "due_date", "amount", "status", "acceptance_notes", "stripe_invoice_id")
    readonly_fields = ("stripe_invoice_id",)
    extra = 1


class EventInline(admin.TabularInline[EngagementEvent, Engagement]):
    """What the customer reads at /v1/engagements; staff may post a message here."""

    model = EngagementEvent
    fields = ("created_at", "kind", "message")
    readonly_fields = ("created_at", "kind")
    extra = 0
    can_delete = False
    verbose_name_plural = "events (customer-visible)"

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False  # what was said stays said

    def get_queryset(self, request: HttpRequest) -> QuerySet[EngagementEvent]:
        return EngagementEvent._plain.order_by("-id")


# --- action forms ---------------------------------------------------------------------------


class LaunchForm(forms.Form):
    kind = forms.ChoiceField(
        choices=[
            (JobKind.FINE_TUNING.value, "Fine-tuning"),
            (JobKind.COMPRESSION.value, "Compression"),
        ]
    )
    model = forms.CharField(
        max_length=300,
        help_text="A base model id, or one of the customer's (or this engagement's) models.",
    )
    training_file = forms.CharField(
        max_length=64, required=False, help_text="A file id of the customer's (purpose fine-tune)."
    )
    validation_file = forms.CharField(max_length=64, required=False)
    suffix = forms.CharField(max_length=64, required=False)
    n_epochs = forms.IntegerField(min_value=1, required=False, help_text="Empty: auto.")
    method = forms.ChoiceField(
        choices=[("", "—"), ("quantize", "quantize"), ("prune", "prune"), ("distill", "distill")],
        required=False,
        help_text="Compression only.",
    )

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        if data.get("kind") == JobKind.COMPRESSION and not data.get("method"):
            self.add_error("method", "A compression job needs a method.")
        return data

    def job_data(self) -> dict[str, Any]:
        """The body the customer's API would take for this job."""
        d = self.cleaned_data
        data: dict[str, Any] = {"model": d["model"].strip()}
        for name in ("training_file", "validation_file", "suffix"):
            if d.get(name):
                data[name] = d[name].strip()
        if d["kind"] == JobKind.COMPRESSION:
            data["method"] = d["method"]
        elif d.get("n_epochs"):
            data["method"] = {
                "type": "supervised",
                "supervised": {"hyperparameters": {"n_epochs": d["n_epochs"]}},
            }
        return data


class DeliverForm(forms.Form):
    model = forms.ChoiceField(choices=[])
    deploy = forms.BooleanField(required=False, help_text="Also create a serverless deployment.")

    def __init__(self, *args: Any, choices: list[tuple[str, str]], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        model = self.fields["model"]
        assert isinstance(model, forms.ChoiceField)
        model.choices = choices


# --- the engagement -------------------------------------------------------------------------


class BudgetUsedFilter(admin.SimpleListFilter):
    title = "budget used"
    parameter_name = "budget"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [("over", "100% or more"), ("spent", "anything spent")]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        if self.value() == "over":
            return queryset.filter(
                Q(spent_amount__gte=F("budget_amount"))
                | Q(spent_tokens__gte=F("budget_tokens"))
                | Q(spent_gpu_seconds__gte=F("budget_gpu_seconds"))
            )
        if self.value() == "spent":
            return queryset.filter(Q(spent_amount__gt=0) | Q(spent_gpu_seconds__gt=0))
        return queryset


def _shown(value: object) -> object:
    """Budget figures as staff read them: money to 4 decimals (sub-cent spend stays visible,
    not 0.01404800000000000000), counts as they are."""
    if isinstance(value, Decimal):
        return value.quantize(Decimal("0.0001"))
    return value


@admin.register(Engagement)
class EngagementAdmin(admin.ModelAdmin[Engagement]):
    change_form_template = "admin/engagements/engagement/change_form.html"
    list_display = (
        "title",
        "organization",
        "status",
        "owner",
        "budget_used",
        "next_milestone",
        "created_at",
    )
    list_filter = ("status", ("owner", admin.RelatedOnlyFieldListFilter), BudgetUsedFilter)
    search_fields = ("id", "title", "organization__name", "organization__id", "owner__email")
    list_select_related = ("organization", "owner")
    date_hierarchy = "created_at"
    inlines = [MilestoneInline, EventInline]
    fieldsets = (
        (
            None,
            {"fields": ("organization", "title", "scope", "status", "owner", "owner_display_name")},
        ),
        ("Budget", {"fields": ("budget_tokens", "budget_gpu_seconds", "budget_amount")}),
        ("Staff only", {"fields": ("internal_notes",)}),
    )

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> tuple[str, ...]:
        # The status moves only by its transitions; the organization is fixed once jobs may
        # run in it.
        return ("status",) if obj is None else ("organization", "status")

    def get_fieldsets(self, request: HttpRequest, obj: Any = None) -> Any:
        if obj is None:  # a new engagement is a lead: no status to show yet
            main = ("organization", "title", "scope", "owner", "owner_display_name")
            return ((None, {"fields": main}), *self.fieldsets[1:])
        return self.fieldsets

    def get_queryset(self, request: HttpRequest) -> QuerySet[Engagement]:
        return selectors.with_spend(super().get_queryset(request))

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False  # jobs ran and money moved: cancel it instead

    @admin.display(description="budget used")
    def budget_used(self, obj: Any) -> str:
        spent = Estimate(
            tokens=int(obj.spent_tokens),
            gpu_seconds=int(obj.spent_gpu_seconds),
            amount=Decimal(obj.spent_amount),
        )
        return f"{selectors.used_percent(selectors.budget_limit(obj), spent)}%"

    @admin.display(description="next milestone")
    def next_milestone(self, obj: Any) -> str:
        if not obj.next_milestone_title:
            return "—"
        due = f" (due {obj.next_milestone_due:%Y-%m-%d})" if obj.next_milestone_due else ""
        return f"{obj.next_milestone_title}{due}"

    # --- saving: audited ----------------------------------------------------------------

    def save_model(self, request: HttpRequest, obj: Any, form: Any, change: bool) -> None:
        super().save_model(request, obj, form, change)
        if change and not form.changed_data:
            return
        services.engagement_recorded(
            engagement=obj,
            actor=Actor.from_request(request),
            created=not change,
            fields=list(form.changed_data),
        )

    def save_formset(self, request: HttpRequest, form: Any, formset: Any, change: bool) -> None:
        formset.save()
        touched = [o.pk for o in formset.new_objects] + [o.pk for o, _ in formset.changed_objects]
        gone = [o.pk for o in formset.deleted_objects]
        if touched or gone:
            services.engagement_items_recorded(
                engagement=form.instance,
                actor=Actor.from_request(request),
                model=formset.model.__name__.lower(),
                saved=touched,
                deleted=gone,
            )

    # --- the change page ------------------------------------------------------------------

    def change_view(
        self,
        request: HttpRequest,
        object_id: str,
        form_url: str = "",
        extra_context: dict[str, Any] | None = None,
    ) -> HttpResponse:
        engagement = self.get_object(request, unquote(object_id))
        context = dict(extra_context or {})
        if engagement is not None and self.has_view_or_change_permission(request, engagement):
            context.update(self._panel(request, engagement))
        return super().change_view(request, object_id, form_url, context)

    def _panel(self, request: HttpRequest, engagement: Engagement) -> dict[str, Any]:
        user = request.user
        budget = selectors.engagement_budget(engagement)
        rows = [
            ("Training tokens", "tokens"),
            ("GPU-seconds", "gpu_seconds"),
            ("USD", "amount"),
        ]
        return {
            "engagement": engagement,
            "budget_rows": [
                (
                    label,
                    *(
                        _shown(getattr(part, name))
                        for part in (budget.spent, budget.committed, budget.limit)
                    ),
                )
                for label, name in rows
            ],
            "budget_used": budget.used_percent,
            "unfinished_jobs": budget.unfinished_jobs,
            "milestones": list(engagement.milestones.all()),
            "jobs": list(selectors.engagement_jobs(engagement)[:50]),
            "models": list(selectors.engagement_models(engagement)[:50]),
            "files": list(engagement.files.all()[:50]),
            "dataset_versions": list(engagement.dataset_versions.all()[:50]),
            "can_move": user.has_perm(PERMISSIONS["transition"]),
            "can_launch": user.has_perm(PERMISSIONS["launch"]),
            "can_deliver": user.has_perm(PERMISSIONS["deliver"]),
            "can_bill": user.has_perm(PERMISSIONS["bill"]),
        }

    # --- actions --------------------------------------------------------------------------

    def get_urls(self) -> list[URLPattern]:
        def view(name: str, fn: Any) -> URLPattern:
            return path(  # type: ignore[no-any-return]
                f"<path:object_id>/{name}/",
                self.admin_site.admin_view(fn),
                name=f"engagements_engagement_{name}",
            )

        return [
            view("transition", self.transition_view),
            view("launch", self.launch_view),
            view("deliver", self.deliver_view),
            view("bill", self.bill_view),
            *super().get_urls(),
        ]

    def _allowed(self, request: HttpRequest, object_id: str, action: str) -> Engagement:
        """The engagement, if the staff member may see it and has the action's permission;
        403 otherwise (404 for no such engagement)."""
        engagement = self.get_object(request, unquote(object_id))
        if engagement is None:
            raise Http404(f"No engagement with id '{object_id}'.")
        if not self.has_view_or_change_permission(request, engagement):
            raise PermissionDenied
        if not request.user.has_perm(PERMISSIONS[action]):
            raise PermissionDenied
        return engagement

    def _back(self, engagement: Engagement) -> HttpResponseRedirect:
        return HttpResponseRedirect(
            reverse("admin:engagements_engagement_change", args=[quote(engagement.pk)])
        )

    def transition_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        engagement = self._allowed(request, object_id, "transition")
        if request.method != "POST":
            return HttpResponseNotAllowed(["POST"])
        to_status = request.POST.get("transition", "")
        try:
            moved = services.engagement_transition(
                engagement=engagement, to_status=to_status, actor=Actor.from_request(request)
            )
        except APIException as exc:
            messages.error(request, _message(exc))
        else:
            messages.success(request, f"“{moved.title}” moved to {moved.status}.")
        return self._back(engagement)

    def bill_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        engagement = self._allowed(request, object_id, "bill")
        if request.method != "POST":
            return HttpResponseNotAllowed(["POST"])
        milestone = (
            Milestone.objects.for_organization(engagement.organization_id)
            .filter(engagement=engagement, pk=request.POST.get("bill", ""))
            .first()
        )
        if milestone is None:
            messages.error(request, "No such milestone on this engagement.")
            return self._back(engagement)
        try:
            billed = services.engagement_milestone_bill(
                milestone=milestone, actor=Actor.from_request(request)
            )
        except APIException as exc:
            messages.error(request, _message(exc))
        else:
            messages.success(
                request,
                f"Milestone “{billed.title}” billed: {billed.amount} USD on Stripe invoice "
                f"{billed.stripe_invoice_id} ({billed.stripe_invoice_status}).",
            )
        return self._back(engagement)

    def _page(
        self, request: HttpRequest, engagement: Engagement, template: str, **context: Any
    ) -> TemplateResponse:
        return TemplateResponse(
            request,
            f"admin/engagements/engagement/{template}",
            {
                **self.admin_site.each_context(request),
                "opts": self.model._meta,
                "engagement": engagement,
                "title": f"{context.pop('heading')}: {engagement.title}",
                **context,
            },
        )

    def launch_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        engagement = self._allowed(request, object_id, "launch")
        form = LaunchForm(request.POST or None)
        if request.method == "POST" and form.is_valid():
            try:
                job = services.engagement_job_launch(
                    engagement=engagement,
                    kind=form.cleaned_data["kind"],
                    data=form.job_data(),
                    actor=Actor.from_request(request),
                )
            except APIException as exc:
                messages.error(request, _message(exc))
            else:
                messages.success(
                    request, f"Launched {job.pk} for “{engagement.title}” ({job.status})."
                )
                return self._back(engagement)
        files = (
            File.objects.for_organization(engagement.organization_id)
            .filter(purpose="fine-tune", status=FileStatus.PROCESSED, deleted_at__isnull=True)
            .order_by("-pk")[:50]
        )
        return self._page(
            request,
            engagement,
            "launch.html",
            heading="Launch a job",
            form=form,
            files=list(files),
            models=list(selectors.engagement_models(engagement)[:50]),
        )

    def deliver_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        engagement = self._allowed(request, object_id, "deliver")
        choices = [(m.pk, m.pk) for m in selectors.deliverable_models(engagement)[:200]]
        form = DeliverForm(request.POST or None, choices=choices)
        if request.method == "POST" and form.is_valid():
            try:
                model = services.engagement_model_deliver(
                    engagement=engagement,
                    model_id=form.cleaned_data["model"],
                    deploy=bool(form.cleaned_data["deploy"]),
                    actor=Actor.from_request(request),
                )
            except APIException as exc:
                messages.error(request, _message(exc))
            else:
                messages.success(request, f"Delivered {model.pk} to {engagement.organization}.")
                return self._back(engagement)
        elif request.method == "POST":
            messages.error(request, "Choose one of this engagement's undelivered models.")
        return self._page(request, engagement, "deliver.html", heading="Deliver a model", form=form)
