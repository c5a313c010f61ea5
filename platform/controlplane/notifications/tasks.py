"""Webhook deliveries on the `control` queue: one attempt per task, safe to run twice."""

from __future__ import annotations

from celery import shared_task

from jobcontracts import queues

from .delivery import attempt_deliver
from .models import Webhook, WebhookDelivery, WebhookEvent


@shared_task(
    name="controlplane.notifications.deliver",
    queue=queues.CONTROL,
    acks_late=True,
    soft_time_limit=30,
    time_limit=45,
)
def deliver(webhook_id: str, event_id: str, attempt: int) -> str:
    """Attempt `attempt` of sending one event to one webhook; schedules the next attempt
    (as a new task with a countdown) when this one failed in a way worth retrying."""
    # By id, from our own task (the event names the organization it belongs to).
    webhook = Webhook.objects.dangerously_unscoped().filter(pk=webhook_id).first()
    if webhook is None or not webhook.enabled:
        return "skipped"
    event = WebhookEvent.objects.for_organization(webhook.organization_id).filter(pk=event_id)
    found = event.first()
    if found is None:
        return "skipped"
    done = WebhookDelivery.objects.for_organization(webhook.organization_id).filter(
        webhook=webhook, event=found, attempt=attempt
    )
    if done.exists():  # this attempt ran already (a redelivered task)
        return "duplicate"
    result = attempt_deliver(webhook=webhook, event=found, attempt=attempt)
    if result.retry_in is not None:
        deliver.apply_async((webhook_id, event_id, attempt + 1), countdown=result.retry_in)
    return str(result.row.outcome)
