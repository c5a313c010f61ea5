"""One delivery attempt: sign, POST, record, and say whether (and when) to retry."""

from __future__ import annotations

import hashlib
import hmac
import time
from dataclasses import dataclass
from datetime import timedelta

import httpx
import orjson
import structlog
from django.conf import settings
from django.utils import timezone

from controlplane.core import metrics

from .models import DeliveryOutcome, Webhook, WebhookDelivery, WebhookEvent
from .urlcheck import UrlRefused, url_check

log = structlog.get_logger(__name__)

SIGNATURE_HEADER = "Atelier-Signature"


def signature(secret: str, timestamp: int, payload: bytes) -> str:
    """`t=<unix>,v1=<hex HMAC-SHA256 of "t.payload">`, as Stripe signs its webhooks."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + payload, hashlib.sha256)
    return f"t={timestamp},v1={mac.hexdigest()}"


def body(event: WebhookEvent) -> bytes:
    return orjson.dumps(
        {
            "id": event.pk,
            "object": "event",
            "type": event.type,
            "created": int(event.created_at.timestamp()),
            "organization_id": event.organization_id,
            "data": {"object": event.data},
        }
    )


def _retryable(status: int) -> bool:
    return status >= 500 or status == 429


@dataclass(frozen=True)
class Attempt:
    row: WebhookDelivery
    retry_in: float | None  # seconds until the next attempt; None: no more


def _post(webhook: Webhook, payload: bytes, headers: dict[str, str]) -> int:
    target = url_check(webhook.url)  # again at each delivery: DNS may have changed
    url = httpx.URL(webhook.url)
    extensions: dict[str, str] = {}
    if target.address is not None:
        # Connect to the address just checked; Host and TLS (SNI, the certificate's
        # name) stay the URL's host.
        headers = {**headers, "Host": url.netloc.decode("ascii")}
        extensions["sni_hostname"] = target.host
        url = url.copy_with(host=str(target.address))
    with (
        httpx.Client(follow_redirects=False, timeout=settings.WEBHOOK_TIMEOUT_SECONDS) as client,
        # Streamed and never read: only the status counts, whatever size the body is.
        client.stream(
            "POST", url, content=payload, headers=headers, extensions=extensions
        ) as response,
    ):
        return response.status_code


def attempt_deliver(*, webhook: Webhook, event: WebhookEvent, attempt: int) -> Attempt:
    payload = body(event)
    now = int(time.time())
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "Atelier-Webhooks/1",
        SIGNATURE_HEADER: signature(webhook.secret, now, payload),
        "Atelier-Event-Id": event.pk,
    }
    status: int | None = None
    error = ""
    retryable = False
    started = time.monotonic()
    try:
        status = _post(webhook, payload, headers)
        if not 200 <= status < 300:
            error = f"HTTP {status}"
            retryable = _retryable(status)
    except UrlRefused as exc:
        error = str(exc)
    except httpx.TimeoutException:
        error, retryable = "timed out", True
    except httpx.HTTPError as exc:
        error, retryable = f"{type(exc).__name__}: {exc}", True
    duration_ms = int((time.monotonic() - started) * 1000)
    backoff = settings.WEBHOOK_RETRY_DELAYS_SECONDS
    retry_in = backoff[attempt - 1] if retryable and attempt <= len(backoff) else None
    if status is not None and 200 <= status < 300:
        outcome = DeliveryOutcome.SUCCEEDED
    elif retry_in is not None:
        outcome = DeliveryOutcome.RETRYING
    else:
        outcome = DeliveryOutcome.FAILED
    row, _ = WebhookDelivery.objects.for_organization(webhook.organization_id).get_or_create(
        webhook=webhook,
        event=event,
        attempt=attempt,
        defaults={
            "organization_id": webhook.organization_id,
            "outcome": outcome,
            "status_code": status,
            "error": error[:500],
            "duration_ms": duration_ms,
            "next_retry_at": (
                timezone.now() + timedelta(seconds=retry_in) if retry_in is not None else None
            ),
        },
    )
    metrics.WEBHOOK_DELIVERIES.labels(type=event.type, outcome=str(outcome)).inc()
    metrics.WEBHOOK_DELIVERY_SECONDS.observe(duration_ms / 1000)
    log.info(
        "notifications.delivery",
        webhook_id=webhook.pk,
        event_id=event.pk,
        attempt=attempt,
        outcome=outcome,
        status_code=status,
        duration_ms=duration_ms,
    )
    return Attempt(row=row, retry_in=retry_in)
