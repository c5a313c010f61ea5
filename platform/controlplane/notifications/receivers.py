"""The signals of the apps below, turned into webhook events (sent after commit)."""

from __future__ import annotations

from typing import Any

from django.db.models.signals import post_save

from controlplane.batches.apis import batch_out
from controlplane.batches.models import Batch
from controlplane.batches.signals import batch_finished
from controlplane.billing.apis import invoice_out
from controlplane.billing.models import Invoice, InvoiceStatus
from controlplane.billing.signals import invoice_status_changed
from controlplane.jobs.apis import compression_job_out, job_out
from controlplane.jobs.evaluation import evaluation_out
from controlplane.jobs.models import TERMINAL, Job, JobKind
from controlplane.jobs.signals import job_transitioned
from controlplane.limits.models import BudgetAlert
from controlplane.payments.signals import stripe_invoice_settled

from .services import event_emit

_JOB_OUT = {
    JobKind.FINE_TUNING: ("fine_tuning.job", job_out),
    JobKind.COMPRESSION: ("compression.job", compression_job_out),
    JobKind.EVALUATION: ("evaluation.job", evaluation_out),
}


def _job(job: Job, after: str, **_: Any) -> None:
    if after not in TERMINAL or job.kind not in _JOB_OUT:
        return
    prefix, out = _JOB_OUT[JobKind(job.kind)]
    job_id, org_id, attempt = job.pk, job.organization_id, job.attempt

    def data() -> dict[str, Any]:
        return out(Job.objects.for_organization(org_id).get(pk=job_id))

    event_emit(
        organization_id=org_id,
        type=f"{prefix}.{after}",
        key=f"{prefix}.{after}:{job_id}:{attempt}",
        data=data,
    )


def _batch(batch_id: str, organization_id: str, status: str, **_: Any) -> None:
    def data() -> dict[str, Any]:
        return batch_out(Batch.objects.for_organization(organization_id).get(pk=batch_id))

    event_emit(
        organization_id=organization_id,
        type=f"batch.{status}",
        key=f"batch.{status}:{batch_id}",
        data=data,
    )


_INVOICE_EVENTS = {InvoiceStatus.OPEN: "invoice.finalized", InvoiceStatus.PAID: "invoice.paid"}


def _invoice(organization_id: str, invoice_id: str, status: str, **_: Any) -> None:
    type_ = _INVOICE_EVENTS.get(InvoiceStatus(status))
    if type_ is None:
        return

    def data() -> dict[str, Any]:
        return invoice_out(Invoice.objects.for_organization(organization_id).get(pk=invoice_id))

    event_emit(organization_id=organization_id, type=type_, key=f"{type_}:{invoice_id}", data=data)


def _invoice_settled(organization: Any, invoice: dict[str, Any], status: str, **_: Any) -> None:
    if status != "payment_failed":
        return  # `invoice.paid` comes from the ledger invoice's status (`_invoice`)
    stripe_id = str(invoice.get("id", ""))
    ledger_id = (invoice.get("metadata") or {}).get("atelier_invoice_id")
    payload = {
        "object": "invoice",
        "id": ledger_id,
        "stripe_invoice_id": stripe_id,
        "status": "payment_failed",
        "amount_due": invoice.get("amount_due"),
        "currency": invoice.get("currency"),
        "attempt_count": invoice.get("attempt_count"),
    }
    # Each failed attempt is its own event (Stripe retries a charge several times).
    attempt = invoice.get("attempt_count") or 0
    event_emit(
        organization_id=organization.pk,
        type="invoice.payment_failed",
        key=f"invoice.payment_failed:{stripe_id}:{attempt}",
        data=payload,
    )


def _budget_alert(instance: BudgetAlert, created: bool, **_: Any) -> None:
    if not created:
        return
    budget = instance.budget
    event_emit(
        organization_id=instance.organization_id,
        type="budget.threshold_reached",
        key=f"budget.threshold_reached:{instance.pk}",
        data={
            "object": "budget.alert",
            "id": instance.pk,
            "budget_id": instance.budget_id,
            "budget_name": budget.name,
            "amount": str(budget.amount),
            "threshold": instance.threshold,
            "spent": str(instance.spent),
            "period_start": int(instance.period_start.timestamp()),
        },
    )


def connect() -> None:
    job_transitioned.connect(_job, dispatch_uid="notifications.job")
    batch_finished.connect(_batch, dispatch_uid="notifications.batch")
    invoice_status_changed.connect(_invoice, dispatch_uid="notifications.invoice")
    stripe_invoice_settled.connect(_invoice_settled, dispatch_uid="notifications.invoice_settled")
    post_save.connect(_budget_alert, sender=BudgetAlert, dispatch_uid="notifications.budget")
