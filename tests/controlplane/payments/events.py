"""Stripe webhook events for tests, signed with Stripe's real scheme.

Stripe-Signature: `t=<unix>,v1=<hex HMAC-SHA256(secret, "<t>.<raw body>")>`.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import json
import time
from typing import Any

from rest_framework.test import APIClient

from tests.support.localstripe import WEBHOOK_SECRET

URL = "/v1/stripe/webhook"
_ids = itertools.count(1)


def event(type_: str, obj: dict[str, Any], *, created: int | None = None) -> dict[str, Any]:
    return {
        "id": f"evt_test_{time.time_ns()}_{next(_ids)}",
        "object": "event",
        "type": type_,
        "created": created if created is not None else int(time.time()),
        "api_version": "2024-06-20",
        "data": {"object": obj},
    }


def sign(body: bytes, *, secret: str = WEBHOOK_SECRET, t: int | None = None) -> str:
    t = int(time.time()) if t is None else t
    mac = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


def body_of(evt: dict[str, Any]) -> bytes:
    return json.dumps(evt, indent=2).encode()


def post(body: bytes, signature: str | None) -> Any:
    headers = {"HTTP_STRIPE_SIGNATURE": signature} if signature is not None else {}
    return APIClient().post(URL, data=body, content_type="application/json", **headers)


def deliver(evt: dict[str, Any], **sign_kwargs: Any) -> Any:
    body = body_of(evt)
    return post(body, sign(body, **sign_kwargs))


def subscription(
    sub_id: str,
    customer: str,
    *,
    status: str = "active",
    plan: str = "pro",
    stripe_plan: str = "",
    period_end: int | None = None,
    cancel_at_period_end: bool = False,
) -> dict[str, Any]:
    return {
        "id": sub_id,
        "object": "subscription",
        "customer": customer,
        "status": status,
        "cancel_at_period_end": cancel_at_period_end,
        "metadata": {"plan": plan},
        "items": {"data": [{"id": "si_test", "plan": {"id": stripe_plan or f"plan_{plan}"}}]},
        "current_period_end": period_end or int(time.time()) + 30 * 86400,
    }


def invoice(inv_id: str, customer: str, **extra: Any) -> dict[str, Any]:
    return {
        "id": inv_id,
        "object": "invoice",
        "customer": customer,
        "amount_due": 2900,
        "currency": "usd",
        "hosted_invoice_url": f"https://invoice.stripe.test/{inv_id}",
        **extra,
    }
