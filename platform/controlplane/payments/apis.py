"""Subscription and prepaid-credit endpoints (billing role), and the Stripe webhook."""

from __future__ import annotations

import uuid
from typing import Any

import structlog
from django.conf import settings
from django.http import HttpRequest, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_POST
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import serializers
from rest_framework.request import Request
from rest_framework.response import Response

from controlplane.billing.credits import credit_balance
from controlplane.billing.models import CreditGrant
from controlplane.core.errors import ApiError, error_body, error_parts
from controlplane.core.pagination import list_response, paginate
from controlplane.core.serializers import StrictInputSerializer, unix, validated
from controlplane.tenancy.apis_base import OrganizationApi

from . import gateway, services, webhooks
from .models import Subscription

log = structlog.get_logger(__name__)


def subscription_out(row: Subscription) -> dict[str, Any]:
    return {
        "object": "organization.subscription",
        "plan": row.plan or None,
        "status": row.status,
        "current_period_end": unix(row.current_period_end),
        "cancel_at_period_end": row.cancel_at_period_end,
        "organization_plan": row.organization.plan,
    }


class SubscriptionDetailApi(OrganizationApi):
    """GET shows the subscription; POST starts one or changes its plan (Stripe prorates)."""

    scopes = {"read": "billing.read", "write": "billing.write"}

    class InputSerializer(StrictInputSerializer):
        class Meta:
            ref_name = "SubscriptionSetRequest"

        plan = serializers.CharField(max_length=32)
        payment_method = serializers.RegexField(
            r"^pm_[A-Za-z0-9_]{1,250}$", required=False, max_length=255
        )

    @extend_schema(responses={200: dict})
    def get(self, request: Request) -> Response:
        return Response(subscription_out(services.subscription_get(self.organization)))

    @extend_schema(request=InputSerializer, responses={200: dict})
    def post(self, request: Request) -> Response:
        data = validated(self.InputSerializer, request.data)
        row = services.subscription_set_plan(
            organization=self.organization,
            plan_code=data["plan"],
            payment_method=data.get("payment_method"),
        )
        return Response(subscription_out(row))


class SubscriptionCancelApi(OrganizationApi):
    """Cancel at the end of the paid period (default) or, with `at_period_end: false`, now."""

    scopes = {"read": "billing.read", "write": "billing.write"}

    class InputSerializer(StrictInputSerializer):
        class Meta:
            ref_name = "SubscriptionCancelRequest"

        at_period_end = serializers.BooleanField(default=True)

    @extend_schema(request=InputSerializer, responses={200: dict})
    def post(self, request: Request) -> Response:
        data = validated(self.InputSerializer, request.data if request.data else {})
        row = services.subscription_cancel(
            organization=self.organization, at_period_end=data["at_period_end"]
        )
        return Response(subscription_out(row))


def credit_grant_out(grant: CreditGrant) -> dict[str, Any]:
    return {
        "id": grant.pk,
        "object": "organization.credit_grant",
        "amount": f"{grant.amount:.2f}",
        "source": grant.source,
        "note": grant.note,
        "created_at": unix(grant.created_at),
    }


class OrganizationCreditsApi(OrganizationApi):
    """GET: prepaid credit balance and grants (newest first); POST: buy credit through Stripe.

    POST answers a PaymentIntent's `client_secret` for Stripe.js to confirm; the
    credit is granted when Stripe reports the payment (`payment_intent.succeeded`).
    """

    scopes = {"read": "billing.read", "write": "billing.write"}

    class InputSerializer(StrictInputSerializer):
        class Meta:
            ref_name = "CreditPurchaseRequest"

        amount = serializers.DecimalField(max_digits=12, decimal_places=2)

    @extend_schema(
        operation_id="list_credits",
        parameters=[OpenApiParameter("after", str), OpenApiParameter("limit", int)],
        responses={200: dict},
    )
    def get(self, request: Request) -> Response:
        grants = CreditGrant.objects.for_organization(self.organization)
        rows, has_more = paginate(grants, request)
        response = list_response(rows, has_more, credit_grant_out)
        response.data["balance"] = f"{credit_balance(self.organization):.2f}"
        response.data["currency"] = settings.STRIPE_CURRENCY
        return response

    @extend_schema(operation_id="buy_credits", request=InputSerializer, responses={200: dict})
    def post(self, request: Request) -> Response:
        data = validated(self.InputSerializer, request.data)
        key = request.headers.get("idempotency-key") or uuid.uuid4().hex
        if len(key) > 200:
            raise ApiError(
                "The Idempotency-Key header is at most 200 characters.",
                param="Idempotency-Key",
                code="invalid_value",
            )
        intent = services.credit_purchase_start(
            organization=self.organization, amount=data["amount"], request_key=key
        )
        return Response(
            {
                "object": "organization.credit_purchase",
                "payment_intent": intent["id"],
                "client_secret": intent.get("client_secret"),
                "status": intent.get("status"),
                "amount": f"{data['amount']:.2f}",
                "currency": settings.STRIPE_CURRENCY,
            }
        )


def _refuse(message: str, status: int = 400, code: str = "invalid_webhook") -> JsonResponse:
    return JsonResponse(error_body(message, status_code=status, code=code), status=status)


@csrf_exempt
@require_POST
def stripe_webhook(request: HttpRequest) -> JsonResponse:
    """Stripe's events. No API key: the Stripe-Signature header over the raw body is the proof.

    200 once the event is recorded (applied, ignored, or failed for good: see
    `webhooks`); 400 for a body that is not a signed event; 5xx for a transient
    failure, which Stripe retries.
    """
    if not gateway.enabled() or not settings.STRIPE_WEBHOOK_SECRET:
        return _refuse(
            "Stripe webhooks are not configured on this server (STRIPE_API_KEY or "
            "STRIPE_WEBHOOK_SECRET is empty).",
            503,
            "billing_disabled",
        )
    length = int(request.headers.get("content-length") or 0)
    if length > settings.STRIPE_WEBHOOK_MAX_BYTES:
        return _refuse(
            f"The body is {length} bytes; webhooks are at most "
            f"{settings.STRIPE_WEBHOOK_MAX_BYTES}.",
            413,
            "request_too_large",
        )
    payload = request.body  # the raw bytes: the signature covers them exactly
    try:
        gateway.signature_verify(payload, request.headers.get("stripe-signature"))
        event = webhooks.parse(payload)
    except ValueError as exc:
        log.warning("payments.webhook_refused", reason=str(exc))
        return _refuse(f"Webhook refused: {exc}. Nothing was changed.")
    try:
        outcome, applied = webhooks.event_process(event)
    except ApiError as exc:  # transient (permanent ones come back as "failed"): Stripe retries
        status, body, _ = error_parts(exc)
        return JsonResponse(body, status=status)
    # 200 also for "failed": Stripe retries any other answer, and this one would fail again.
    return JsonResponse({"received": True, "outcome": outcome, "applied": applied})
