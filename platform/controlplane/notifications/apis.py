"""`/v1/webhooks`: create, list, retrieve, update, delete, rotate the secret, deliveries."""

from __future__ import annotations

from typing import Any

from drf_spectacular.utils import extend_schema
from rest_framework import serializers
from rest_framework.request import Request
from rest_framework.response import Response

from controlplane.audit.services import Actor
from controlplane.core.pagination import list_response, paginate
from controlplane.core.serializers import StrictInputSerializer, unix, validated
from controlplane.tenancy.apis_base import OrganizationApi

from . import services
from .models import Webhook, WebhookDelivery


def webhook_out(webhook: Webhook, *, secret: bool = False) -> dict[str, Any]:
    out = {
        "id": webhook.pk,
        "object": "webhook",
        "url": webhook.url,
        "events": webhook.events,
        "description": webhook.description,
        "enabled": webhook.enabled,
        "created_at": unix(webhook.created_at),
        "updated_at": unix(webhook.updated_at),
    }
    if secret:  # only when made or rotated: it is never shown again
        out["secret"] = webhook.secret
    return out


def delivery_out(row: WebhookDelivery) -> dict[str, Any]:
    return {
        "id": row.pk,
        "object": "webhook.delivery",
        "event_id": row.event_id,
        "event_type": row.event.type,
        "attempt": row.attempt,
        "outcome": row.outcome,
        "status_code": row.status_code,
        "error": row.error or None,
        "duration_ms": row.duration_ms,
        "next_retry_at": unix(row.next_retry_at),
        "created_at": unix(row.created_at),
    }


def _events(**kwargs: Any) -> serializers.ListField:
    return serializers.ListField(
        child=serializers.CharField(max_length=64), min_length=1, max_length=32, **kwargs
    )


class WebhooksApi(OrganizationApi):
    # Managing where the organization's events go is an organization admin's act.
    scopes = {"read": "organization.read", "write": "organization.write"}

    def _webhook(self, webhook_id: str) -> Webhook:
        return self.get_owned(Webhook, webhook_id, label="webhook")


class WebhookListCreateApi(WebhooksApi):
    class InputSerializer(StrictInputSerializer):
        class Meta:
            ref_name = "WebhookCreateRequest"

        url = serializers.CharField(max_length=2048)
        events = _events()
        description = serializers.CharField(
            max_length=500, required=False, allow_blank=True, default=""
        )

    @extend_schema(responses={200: dict}, operation_id="list_webhooks")
    def get(self, request: Request) -> Response:
        rows, has_more = paginate(Webhook.objects.for_organization(self.organization), request)
        return list_response(rows, has_more, webhook_out)

    @extend_schema(request=InputSerializer, responses={201: dict})
    def post(self, request: Request) -> Response:
        data = validated(self.InputSerializer, request.data)
        webhook = services.webhook_create(
            organization=self.organization, actor=Actor.from_request(request), **data
        )
        return Response(webhook_out(webhook, secret=True), status=201)


class WebhookDetailApi(WebhooksApi):
    class InputSerializer(StrictInputSerializer):
        class Meta:
            ref_name = "WebhookUpdateRequest"

        url = serializers.CharField(max_length=2048, required=False)
        events = _events(required=False)
        description = serializers.CharField(max_length=500, required=False, allow_blank=True)
        enabled = serializers.BooleanField(required=False)

    @extend_schema(responses={200: dict})
    def get(self, request: Request, webhook_id: str) -> Response:
        return Response(webhook_out(self._webhook(webhook_id)))

    @extend_schema(request=InputSerializer, responses={200: dict}, operation_id="update_webhook")
    def post(self, request: Request, webhook_id: str) -> Response:
        webhook = self._webhook(webhook_id)
        data = validated(self.InputSerializer, request.data)
        webhook = services.webhook_update(
            webhook=webhook, changes=data, actor=Actor.from_request(request)
        )
        return Response(webhook_out(webhook))

    @extend_schema(request=InputSerializer, responses={200: dict}, operation_id="patch_webhook")
    def patch(self, request: Request, webhook_id: str) -> Response:
        return self.post(request, webhook_id)

    @extend_schema(responses={200: dict})
    def delete(self, request: Request, webhook_id: str) -> Response:
        webhook = self._webhook(webhook_id)
        services.webhook_delete(webhook=webhook, actor=Actor.from_request(request))
        return Response({"object": "webhook.deleted", "id": webhook_id, "deleted": True})


class WebhookRotateSecretApi(WebhooksApi):
    scopes = {"write": "organization.write"}

    @extend_schema(request=None, responses={200: dict})
    def post(self, request: Request, webhook_id: str) -> Response:
        webhook = services.webhook_rotate_secret(
            webhook=self._webhook(webhook_id), actor=Actor.from_request(request)
        )
        return Response(webhook_out(webhook, secret=True))


class WebhookDeliveryListApi(WebhooksApi):
    scopes = {"read": "organization.read"}

    @extend_schema(responses={200: dict}, operation_id="list_webhook_deliveries")
    def get(self, request: Request, webhook_id: str) -> Response:
        webhook = self._webhook(webhook_id)
        rows, has_more = paginate(
            WebhookDelivery.objects.for_organization(self.organization)
            .filter(webhook=webhook)
            .select_related("event"),
            request,
        )
        return list_response(rows, has_more, delivery_out)
