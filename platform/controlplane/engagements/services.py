"""Staff actions on engagements: create, move, launch jobs, deliver models, bill milestones.

Every action is recorded in the customer organization's audit log (`audit_record`, with
the staff member's `Actor`: who, when, what) inside the transaction of the change, and
leaves the customer an event where it concerns them. A refused action raises an
`ApiError` whose message says why and what to do, and changes nothing. Permission checks
are the caller's (the admin views check the engagement permissions).
"""

from __future__ import annotations

from datetime import date
from decimal import Decimal
from typing import Any, Final

import structlog
from django.conf import settings
from django.db import transaction
from django.utils import timezone

from controlplane.audit.models import ActorType
from controlplane.audit.services import Actor, audit_record
from controlplane.core.errors import ApiError, Conflict, NotFound
from controlplane.core.serializers import validated
from controlplane.inference.deployments import deployment_create, deployment_for_model
from controlplane.inference.models import Deployment, DeploymentType
from controlplane.jobs import compression, params
from controlplane.jobs import services as job_services
from controlplane.jobs.models import Job, JobKind, JobStatus
from controlplane.modelregistry.models import CustomerModel, ModelKind
from controlplane.payments import gateway
from controlplane.tenancy.models import Organization

from .estimates import Estimate, compression_estimate, fine_tuning_estimate, job_estimate
from .models import (
    BILLABLE,
    DELIVERABLE,
    LAUNCHABLE,
    TRANSITIONS,
    Engagement,
    EngagementEvent,
    EngagementStatus,
    EventKind,
    Milestone,
    MilestoneStatus,
)
from .selectors import Budget, engagement_budget

log = structlog.get_logger(__name__)

#: What `engagement_job_launch` can start.
JOB_KINDS: Final = (JobKind.FINE_TUNING.value, JobKind.COMPRESSION.value)


def _audit(engagement: Engagement, actor: Actor, action: str, details: dict[str, Any]) -> None:
    audit_record(
        organization=engagement.organization_id,
        actor=actor,
        action=f"engagement.{action}",
        target=engagement,
        target_type="engagement",
        details={"engagement_id": engagement.pk, **details},
    )


def _staff_user_id(actor: Actor) -> str | None:
    return actor.id if actor.type == ActorType.STAFF and actor.id else None


def engagement_event_add(
    *, engagement: Engagement, message: str, kind: str = EventKind.MESSAGE
) -> EngagementEvent:
    """A message on the engagement the customer reads (never anything internal)."""
    event: EngagementEvent = EngagementEvent.objects.create(
        organization_id=engagement.organization_id,
        engagement=engagement,
        kind=kind,
        message=message[:2000],
    )
    return event


# --- create ---------------------------------------------------------------------------------


@transaction.atomic
def engagement_create(
    *,
    organization: Organization,
    title: str,
    owner: Any,
    budget_tokens: int,
    budget_gpu_seconds: int,
    budget_amount: Decimal,
    actor: Actor,
    scope: str = "",
    owner_display_name: str = "",
    internal_notes: str = "",
) -> Engagement:
    """A new engagement (a `lead`) for the customer `organization`, run by staff `owner`."""
    if not getattr(owner, "is_staff", False):
        raise ApiError("The owner of an engagement must be a staff member.", param="owner")
    if min(budget_tokens, budget_gpu_seconds) < 0 or budget_amount < 0:
        raise ApiError("Budgets cannot be negative.", param="budget")
    engagement: Engagement = Engagement.objects.create(
        organization=organization,
        title=title,
        scope=scope,
        owner=owner,
        owner_display_name=owner_display_name,
        budget_tokens=budget_tokens,
        budget_gpu_seconds=budget_gpu_seconds,
        budget_amount=budget_amount,
        internal_notes=internal_notes,
    )
    engagement_recorded(engagement=engagement, actor=actor, created=True, fields=["title"])
    return engagement


def engagement_recorded(
    *, engagement: Engagement, actor: Actor, created: bool, fields: list[str]
) -> None:
    """Audit a create or an edit made elsewhere (the admin form): the fields' names only, as
    their values may be internal."""
    _audit(engagement, actor, "created" if created else "changed", {"fields": sorted(fields)})
    if created:
        engagement_event_add(
            engagement=engagement, kind=EventKind.STATUS, message="Engagement opened."
        )


def engagement_items_recorded(
    *, engagement: Engagement, actor: Actor, model: str, saved: list[str], deleted: list[str]
) -> None:
    """Audit milestones or events added, changed or deleted elsewhere (the admin inlines)."""
    _audit(engagement, actor, f"{model}s_changed", {"saved": saved, "deleted": deleted})


@transaction.atomic
def milestone_add(
    *,
    engagement: Engagement,
    title: str,
    amount: Decimal,
    actor: Actor,
    due_date: date | None = None,
    acceptance_notes: str = "",
) -> Milestone:
    if amount < 0:
        raise ApiError("A milestone's amount cannot be negative.", param="amount")
    milestone: Milestone = Milestone.objects.create(
        organization_id=engagement.organization_id,
        engagement=engagement,
        title=title,
        amount=amount,
        due_date=due_date,
        acceptance_notes=acceptance_notes,
    )
    _audit(engagement, actor, "milestone_added", {"milestone_id": milestone.pk})
    return milestone


# --- the pipeline ---------------------------------------------------------------------------


@transaction.atomic
def engagement_transition(*, engagement: Engagement, to_status: str, actor: Actor) -> Engagement:
    """Move the engagement to `to_status`, if `TRANSITIONS` allows it from where it is."""
    engagement = Engagement.objects.locked(engagement)
    allowed = TRANSITIONS[engagement.status]
    if to_status not in EngagementStatus.values:
        raise ApiError(
            f"'{to_status}' is not a status; use one of: {', '.join(EngagementStatus.values)}.",
            param="status",
            code="invalid_status",
        )
    if to_status not in allowed:
        where = (
            f"it can move to: {', '.join(allowed)}"
            if allowed
            else f"'{engagement.status}' is final, it cannot move any more"
        )
        raise Conflict(
            f"An engagement cannot move from '{engagement.status}' to '{to_status}'; {where}.",
            param="status",
            code="invalid_transition",
        )
    before = engagement.status
    engagement.status = to_status
    engagement.status_changed_at = timezone.now()
    engagement.save(update_fields=["status", "status_changed_at", "updated_at"])
    engagement_event_add(
        engagement=engagement,
        kind=EventKind.STATUS,
        message=f"Status changed from {before} to {to_status}.",
    )
    _audit(engagement, actor, "transitioned", {"from": before, "to": to_status})
    log.info("engagements.transitioned", engagement_id=engagement.pk, to=to_status)
    return engagement


# --- jobs -----------------------------------------------------------------------------------

#: (Estimate field, what the budget is called, how an amount of it is shown).
_BUDGETS: Final = (
    ("tokens", "training-token", "{:,} tokens"),
    ("gpu_seconds", "GPU-seconds", "{:,} GPU-seconds"),
    ("amount", "money", "{:.2f} USD"),
)


def budget_check(budget: Budget, estimate: Estimate) -> None:
    """Refuse (409 `budget_exceeded`) a job whose estimate, on top of what is spent and what
    unfinished jobs commit, passes any of the three budgets."""
    for field, label, shown in _BUDGETS:
        spent, committed, this, limit = (
            getattr(part, field)
            for part in (budget.spent, budget.committed, estimate, budget.limit)
        )
        if spent + committed + this > limit:
            raise Conflict(
                f"This job would exceed the engagement's {label} budget: "
                f"{shown.format(spent)} spent + {shown.format(committed)} committed by "
                f"{budget.unfinished_jobs} unfinished job(s) + {shown.format(this)} estimated "
                f"for this job is more than the {shown.format(limit)} budgeted. Raise the "
                "budget or launch a smaller job; nothing was created.",
                code="budget_exceeded",
            )


@transaction.atomic
def engagement_job_launch(
    *, engagement: Engagement, kind: str, data: dict[str, Any], actor: Actor
) -> Job:
    """Launch a fine-tuning or compression job on the customer's behalf, on their files.

    `data` is the body the customer's own API takes (`POST /v1/fine_tuning/jobs` or
    `/v1/compression/jobs`), validated here. The estimate (tokens, GPU-seconds, price) is
    computed first, synchronously; when it would take the engagement past any budget,
    counting what finished jobs spent and what unfinished ones are estimated to use, the
    launch is refused and nothing is created. The engagement row stays locked to the end,
    so concurrent launches are checked one after the other. The job is the customer
    organization's, marked with the engagement: billed to it, hidden from the customer.
    """
    engagement = Engagement.objects.locked(engagement)
    if engagement.status not in LAUNCHABLE:
        raise Conflict(
            f"Jobs are launched for an active engagement; this one is '{engagement.status}'. "
            "Move it to active first.",
            code="engagement_not_active",
        )
    organization = Organization.objects.get(pk=engagement.organization_id)
    if kind == JobKind.FINE_TUNING:
        payload = validated(params.CreateJobInput, data)
        estimate = fine_tuning_estimate(organization=organization, data=payload)
    elif kind == JobKind.COMPRESSION:
        payload = validated(compression.CreateCompressionJobInput, data)
        estimate = compression_estimate(
            organization=organization, data=payload, engagement_id=engagement.pk
        )
    else:
        raise ApiError(
            f"'{kind}' is not a kind of job; use one of: {', '.join(JOB_KINDS)}.",
            param="kind",
            code="invalid_value",
        )
    budget_check(engagement_budget(engagement), estimate)

    user_id = _staff_user_id(actor)
    if kind == JobKind.FINE_TUNING:
        job = job_services.job_create(
            organization=organization, user_id=user_id, data=payload, engagement_id=engagement.pk
        )
        # What job_prepare will store again (the same count and price); the budget needs it
        # now, for the next launch's check.
        epochs = int(job.hyperparameters["n_epochs"])
        job.estimated_tokens = estimate.tokens // max(1, epochs)
        job.estimated_price = estimate.amount
        job.estimated_seconds = estimate.gpu_seconds // max(1, job.gpus)
        job.save(update_fields=["estimated_tokens", "estimated_price", "estimated_seconds"])
    else:
        job = job_services.compression_job_create(
            organization=organization, user_id=user_id, data=payload, engagement_id=engagement.pk
        )
    for file in (job.training_file, job.validation_file):
        if file is not None:
            engagement.files.add(file)
    if job.dataset_version is not None:
        engagement.dataset_versions.add(job.dataset_version)
    label = "fine-tuning" if kind == JobKind.FINE_TUNING else f"compression ({job.method})"
    engagement_event_add(
        engagement=engagement,
        kind=EventKind.JOB,
        message=f"Started a {label} job on {job.source_model_id or job.base_model_id}.",
    )
    _audit(
        engagement,
        actor,
        "job_launched",
        {
            "job_id": job.pk,
            "kind": kind,
            "estimate": {
                "tokens": estimate.tokens,
                "gpu_seconds": estimate.gpu_seconds,
                "amount": str(estimate.amount),
            },
        },
    )
    log.info("engagements.job_launched", engagement_id=engagement.pk, job_id=job.pk)
    return job


# --- delivery -------------------------------------------------------------------------------


def engagement_job_retry_check(job: Job) -> None:
    """Before a job is retried (the job admin's retry, `jobs.services.job_retry`, which calls
    this through the check registered in `EngagementsConfig.ready`): an engagement's job is
    retried only while the engagement is active and when its estimate (the same inputs, so
    the failed job's own estimate) still fits the budget, exactly as a launch is checked."""
    if not job.engagement_id:
        return
    engagement = (
        Engagement.objects.for_organization(job.organization_id)
        .select_for_update()
        .get(pk=job.engagement_id)
    )
    if engagement.status not in LAUNCHABLE:
        raise Conflict(
            f"Jobs are retried for an active engagement; '{engagement.pk}' is "
            f"'{engagement.status}'. Move it to active first.",
            code="engagement_not_active",
        )
    budget_check(engagement_budget(engagement), job_estimate(job))


@transaction.atomic
def engagement_model_deliver(
    *, engagement: Engagement, model_id: str, actor: Actor, deploy: bool = False
) -> CustomerModel:
    """Hand a model the engagement made to its customer: listed in their `/v1/models` and
    callable once deployed (`deploy`: a serverless deployment, through inference).

    Only a final or compressed model of a job of this engagement that succeeded, in this
    engagement's organization: a model of another organization is refused, as are
    checkpoints, other engagements' models and a model delivered already.
    """
    engagement = Engagement.objects.locked(engagement)
    if engagement.status not in DELIVERABLE:
        raise Conflict(
            f"Models are delivered while an engagement is active or delivered; this one is "
            f"'{engagement.status}'.",
            code="engagement_not_active",
        )
    model = (
        CustomerModel.objects.dangerously_unscoped()
        .select_for_update()
        .filter(pk=model_id, deleted_at__isnull=True)
        .first()
    )
    if model is None:
        raise NotFound(f"No model with id '{model_id}' found.", param="model")
    if model.organization_id != engagement.organization_id:
        raise ApiError(
            f"The model '{model_id}' belongs to another organization: an engagement delivers "
            "only its own customer's models, into that customer's organization.",
            param="model",
            code="wrong_organization",
        )
    if model.engagement_id != engagement.pk:
        raise ApiError(
            f"The model '{model_id}' was not made by this engagement's jobs.",
            param="model",
            code="not_an_engagement_model",
        )
    if model.kind not in (ModelKind.FINAL, ModelKind.COMPRESSED):
        raise ApiError(
            f"'{model_id}' is a checkpoint; deliver the job's final model.",
            param="model",
            code="not_an_engagement_model",
        )
    job = (
        Job.objects.for_organization(engagement.organization_id)
        .filter(pk=model.job_id, engagement_id=engagement.pk)
        .first()
    )
    if job is None or job.status != JobStatus.SUCCEEDED:
        raise ApiError(
            f"The job that made '{model_id}' has not succeeded.",
            param="model",
            code="job_not_succeeded",
        )
    if model.delivered_at is not None:
        raise Conflict(
            f"The model '{model_id}' was delivered on {model.delivered_at:%Y-%m-%d %H:%M} UTC.",
            param="model",
            code="already_delivered",
        )
    model.delivered_at = timezone.now()
    model.save(update_fields=["delivered_at"])  # post_save drops the serving caches
    deployment: Deployment | None = None
    if deploy:
        deployment = deployment_for_model(
            organization=engagement.organization_id, model_id=model.pk
        ) or deployment_create(
            organization=Organization.objects.get(pk=engagement.organization_id),
            user_id=_staff_user_id(actor),
            model_id=model.pk,
            type=DeploymentType.SERVERLESS,
        )
    engagement_event_add(
        engagement=engagement,
        kind=EventKind.DELIVERY,
        message=f"Model {model.pk} delivered to your organization"
        + (" and deployed" if deployment else "")
        + ": it is listed at /v1/models.",
    )
    _audit(
        engagement,
        actor,
        "model_delivered",
        {
            "model_id": model.pk,
            "job_id": model.job_id,
            "deployment_id": deployment.pk if deployment else None,
        },
    )
    log.info("engagements.model_delivered", engagement_id=engagement.pk, model_id=model.pk)
    return model


# --- billing --------------------------------------------------------------------------------


def _tag(obj: dict[str, Any], field: str) -> str:
    return str((obj.get("metadata") or {}).get(field) or "")


@transaction.atomic
def engagement_milestone_bill(*, milestone: Milestone, actor: Actor) -> Milestone:
    """Bill a milestone through Stripe: one invoice item, one invoice, finalised and collected.

    Once only: a billed milestone is refused (409 `milestone_already_billed`) and nothing is
    created, here or in Stripe. The milestone row is locked for the whole call; the item
    and the invoice carry the milestone's key (`Milestone.billing_key`) in their metadata
    and idempotency keys derived from it, and are looked up by it before anything is
    created, so a call that died half-way resumes with what it made. Refused while the
    customer has other invoice items pending in Stripe (the invoice would sweep them in).
    Blocking (Stripe round trips).
    """
    milestone = Milestone.objects.locked(milestone)
    engagement = Engagement.objects.for_organization(milestone.organization_id).get(
        pk=milestone.engagement_id
    )
    if milestone.status == MilestoneStatus.BILLED:
        raise Conflict(
            f"The milestone '{milestone.title}' was billed on "
            f"{milestone.billed_at:%Y-%m-%d} (Stripe invoice {milestone.stripe_invoice_id}); "
            "nothing new was created.",
            code="milestone_already_billed",
        )
    if engagement.status not in BILLABLE:
        raise Conflict(
            f"Milestones are billed once an engagement is active; this one is "
            f"'{engagement.status}'.",
            code="engagement_not_active",
        )
    amount_cents = gateway.cents(milestone.amount)
    if amount_cents <= 0:
        raise ApiError(
            f"The milestone '{milestone.title}' has no amount to bill; set its amount first.",
            param="amount",
            code="invalid_value",
        )
    organization = Organization.objects.get(pk=engagement.organization_id)
    customer = gateway.customer_for(organization)
    key = milestone.billing_key
    stripe_id = milestone.stripe_invoice_id or next(
        (
            inv["id"]
            for inv in gateway.invoices_of(customer)
            if _tag(inv, "atelier_invoice_id") == key
        ),
        "",
    )
    item_id = milestone.stripe_invoice_item_id
    if not stripe_id:
        pending = gateway.pending_items_of(customer)
        others = [i["id"] for i in pending if _tag(i, "atelier_invoice_line_id") != key]
        if others:
            raise Conflict(
                f"The customer has other invoice items waiting in Stripe ({', '.join(others)}): "
                "an invoice now would charge them with this milestone. Retry once they are "
                "invoiced.",
                code="pending_invoice_items",
            )
        mine = [i["id"] for i in pending if _tag(i, "atelier_invoice_line_id") == key]
        if mine:
            item_id = mine[0]
        else:
            item = gateway.invoice_item_create(
                customer=customer,
                amount_cents=amount_cents,
                currency=settings.STRIPE_CURRENCY,
                description=f"{engagement.title}: {milestone.title}",
                metadata={
                    "atelier_invoice_line_id": key,
                    "atelier_invoice_id": key,
                    "engagement_id": engagement.pk,
                    "milestone_id": milestone.pk,
                },
            )
            item_id = str(item["id"])
        stripe_id = str(
            gateway.invoice_create(
                customer=customer, invoice_id=key, organization_id=organization.pk
            )["id"]
        )
    current = gateway.invoice_retrieve(stripe_id)
    if current.get("status") == "draft":
        try:
            current = gateway.invoice_pay(stripe_id)
        except ApiError as exc:  # declined or no payment method: the invoice stays open
            log.info(
                "engagements.milestone_collect_failed",
                milestone_id=milestone.pk,
                error=str(exc.detail),
            )
            current = gateway.invoice_retrieve(stripe_id)
    milestone.status = MilestoneStatus.BILLED
    milestone.billed_at = timezone.now()
    milestone.stripe_invoice_item_id = item_id
    milestone.stripe_invoice_id = stripe_id
    milestone.stripe_invoice_status = str(current.get("status") or "")
    milestone.save()
    engagement_event_add(
        engagement=engagement,
        kind=EventKind.BILLING,
        message=f"Milestone '{milestone.title}' billed: {milestone.amount} USD.",
    )
    _audit(
        engagement,
        actor,
        "milestone_billed",
        {
            "milestone_id": milestone.pk,
            "amount": str(milestone.amount),
            "stripe_invoice_id": stripe_id,
        },
    )
    log.info("engagements.milestone_billed", milestone_id=milestone.pk, stripe_invoice=stripe_id)
    return milestone
