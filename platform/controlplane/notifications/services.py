"""Webhooks: create, change, rotate, delete; events: record once and send to subscribers."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterable
from typing import Any

import orjson
import structlog
from django.db import IntegrityError, transaction

from controlplane.audit.services import Actor, audit_record
from controlplane.core.errors import ApiError
from controlplane.tenancy.models import Organization

from .events import EVENT_TYPES, SUBSCRIBABLE
from .models import Webhook, WebhookEvent
from .urlcheck import UrlRefused, url_check

log = structlog.get_logger(__name__)


def _secret() -> str:
    return f"whsec_{secrets.token_urlsafe(32)}"


def _url_valid(url: str) -> str:
    try:
        url_check(url)
    except UrlRefused as exc:
        raise ApiError(str(exc), param="url", code="invalid_url") from None
    return url


def _events_valid(events: Iterable[str]) -> list[str]:
    events = list(dict.fromkeys(events))
    unknown = [e for e in events if e not in SUBSCRIBABLE]
    if unknown or not events:
        what = (
            f"Unknown event type(s) {', '.join(repr(e) for e in unknown)}"
            if unknown
            else ("'events' is empty")
        )
        raise ApiError(
            f"{what}: give '*' or some of {', '.join(EVENT_TYPES)}.",
            param="events",
            code="invalid_value",
        )
    return events


@transaction.atomic
def webhook_create(
    *,
    organization: Organization,
    url: str,
    events: list[str],
    description: str = "",
    actor: Actor,
) -> Webhook:
    webhook = Webhook.objects.create(
        organization=organization,
        url=_url_valid(url),
        events=_events_valid(events),
        description=description,
        secret=_secret(),
    )
    _audit(webhook, actor, "webhook.created", {"url": webhook.url, "events": webhook.events})
    return webhook


def _audit(webhook: Webhook, actor: Actor, action: str, details: dict[str, Any]) -> None:
    audit_record(
        organization=webhook.organization_id,
        actor=actor,
        action=action,
        target=webhook,
        target_type="webhook",
        details=details,
    )


@transaction.atomic
def webhook_update(*, webhook: Webhook, changes: dict[str, Any], actor: Actor) -> Webhook:
    webhook = Webhook.objects.locked(webhook)
    if "url" in changes:
        webhook.url = _url_valid(changes["url"])
    if "events" in changes:
        webhook.events = _events_valid(changes["events"])
    for name in ("description", "enabled"):
        if name in changes:
            setattr(webhook, name, changes[name])
    webhook.save()
    _audit(webhook, actor, "webhook.updated", {"changed": sorted(changes)})
    return webhook


@transaction.atomic
def webhook_rotate_secret(*, webhook: Webhook, actor: Actor) -> Webhook:
    webhook = Webhook.objects.locked(webhook)
    webhook.secret = _secret()
    webhook.save(update_fields=["secret", "updated_at"])
    _audit(webhook, actor, "webhook.secret_rotated", {})
    return webhook


@transaction.atomic
def webhook_delete(*, webhook: Webhook, actor: Actor) -> None:
    _audit(webhook, actor, "webhook.deleted", {"url": webhook.url})
    webhook.delete()


Data = dict[str, Any] | Callable[[], dict[str, Any]]


def event_emit(*, organization_id: str, type: str, key: str, data: Data) -> None:
    """Send `type` about `data` to the organization's webhooks once the current transaction
    commits (at once outside one); a rolled-back change sends nothing. `data` may be a
    function: the object as committed, read only when some webhook wants the event.
    An organization with no webhook for `type` costs one indexed query and nothing after."""
    if not _subscribers(organization_id, type):
        return
    transaction.on_commit(
        lambda: _event_send(organization_id=organization_id, type=type, key=key, data=data)
    )


def _subscribers(organization_id: str, type: str) -> list[str]:
    """The organization's enabled webhooks that want `type` (few per organization)."""
    rows = Webhook.objects.for_organization(organization_id).filter(enabled=True)
    return [w.pk for w in rows.only("id", "events", "enabled") if w.wants(type)]


def _event_send(*, organization_id: str, type: str, key: str, data: Data) -> None:
    from .tasks import deliver

    webhooks = _subscribers(organization_id, type)  # again: changed meanwhile, perhaps
    if not webhooks:
        return
    obj = data() if callable(data) else data
    try:
        with transaction.atomic():
            event = WebhookEvent.objects.create(
                organization_id=organization_id,
                type=type,
                key=key,
                data=orjson.loads(orjson.dumps(obj, default=str)),
            )
    except IntegrityError:
        return  # sent already (a report applied twice, a signal sent again)
    log.info("notifications.event", event_id=event.pk, type=type, webhooks=len(webhooks))
    for webhook_id in webhooks:
        deliver.delay(webhook_id, event.pk, 1)
