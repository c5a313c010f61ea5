"""What engagements hear from the apps below them."""

from __future__ import annotations

from typing import Any

from django.dispatch import receiver

from controlplane.payments.signals import stripe_invoice_settled
from controlplane.tenancy.models import Organization

from .models import EventKind, Milestone
from .services import engagement_event_add


@receiver(stripe_invoice_settled)
def milestone_invoice_settled(
    sender: Any, *, organization: Organization, invoice: dict[str, Any], status: str, **_: Any
) -> None:
    """A billed milestone follows its Stripe invoice: paid later on the hosted page, or its
    payment failed. Once per change (a redelivered event changes nothing); the customer
    reads it as an event of the engagement."""
    milestones = (
        Milestone.objects.for_organization(organization)
        .filter(stripe_invoice_id=str(invoice.get("id") or ""))
        .exclude(stripe_invoice_status=status)
        .select_related("engagement")
    )
    said = {"paid": "was paid", "payment_failed": "payment failed"}.get(status, status)
    for milestone in milestones:
        milestone.stripe_invoice_status = status
        milestone.save(update_fields=["stripe_invoice_status"])
        engagement_event_add(
            engagement=milestone.engagement,
            message=f"The invoice of milestone '{milestone.title}' {said}.",
            kind=EventKind.BILLING,
        )
