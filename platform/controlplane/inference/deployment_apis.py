"""`/v1/deployments` (which models an organization can call) and its raw inference usage."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import serializers
from rest_framework.parsers import JSONParser
from rest_framework.request import Request
from rest_framework.response import Response

from controlplane.core.errors import ApiError
from controlplane.core.pagination import list_response, paginate
from controlplane.core.serializers import StrictInputSerializer, unix, validated
from controlplane.tenancy.apis_base import OrganizationApi

from . import deployments, usage
from .models import Deployment, DeploymentStatus, DeploymentType, UsageRecord


def deployment_out(deployment: Deployment) -> dict[str, Any]:
    return {
        "id": deployment.pk,
        "object": "deployment",
        "model": deployment.model_id,
        "type": deployment.type,
        "min_replicas": deployment.min_replicas,
        "max_replicas": deployment.max_replicas,
        "status": deployment.status,
        "created_at": unix(deployment.created_at),
    }


def usage_out(record: UsageRecord) -> dict[str, Any]:
    return {
        "id": record.pk,
        "object": "inference.usage",
        "request_id": record.request_id,
        "api_key_id": record.api_key_id,
        "model": record.model,
        "kind": record.kind,
        "prompt_tokens": record.prompt_tokens,
        "completion_tokens": record.completion_tokens,
        "total_tokens": record.total_tokens,
        "status": record.status,
        "latency_ms": record.latency_ms,
        "created_at": unix(record.created_at),
    }


class DeploymentsApi(OrganizationApi):
    scopes = {"read": "models.read", "write": "models.write"}
    parser_classes = [JSONParser]

    def _deployment(self, deployment_id: str) -> Deployment:
        # A deleted deployment is gone for the API (the row stays for staff and history).
        return self.get_owned(
            Deployment, deployment_id, label="deployment", status=DeploymentStatus.ACTIVE
        )


class DeploymentListCreateApi(DeploymentsApi):
    class InputSerializer(StrictInputSerializer):
        class Meta:
            ref_name = "DeploymentCreateRequest"

        model = serializers.CharField(max_length=300)
        type = serializers.ChoiceField(choices=DeploymentType.choices)
        min_replicas = serializers.IntegerField(required=False, min_value=0)
        max_replicas = serializers.IntegerField(required=False, min_value=1)

    @extend_schema(
        operation_id="list_deployments",
        parameters=[
            OpenApiParameter("model", str, description="Only this model's deployment."),
            OpenApiParameter("after", str),
            OpenApiParameter("limit", int),
        ],
        responses={200: dict},
    )
    def get(self, request: Request) -> Response:
        queryset = deployments.deployments_active(self.organization)
        model = request.query_params.get("model")
        if model:
            queryset = queryset.filter(model_id=model)
        rows, has_more = paginate(queryset, request)
        return list_response(rows, has_more, deployment_out)

    @extend_schema(request=InputSerializer, responses={200: dict})
    def post(self, request: Request) -> Response:
        data = validated(self.InputSerializer, request.data)
        deployment = deployments.deployment_create(
            organization=self.organization,
            user_id=self.principal.user.pk if self.principal.user else None,
            model_id=data["model"],
            type=data["type"],
            min_replicas=data.get("min_replicas"),
            max_replicas=data.get("max_replicas"),
        )
        return Response(deployment_out(deployment))


class DeploymentDetailApi(DeploymentsApi):
    class InputSerializer(StrictInputSerializer):
        class Meta:
            ref_name = "DeploymentUpdateRequest"

        min_replicas = serializers.IntegerField(required=False, min_value=0)
        max_replicas = serializers.IntegerField(required=False, min_value=1)

    @extend_schema(responses={200: dict})
    def get(self, request: Request, deployment_id: str) -> Response:
        return Response(deployment_out(self._deployment(deployment_id)))

    @extend_schema(request=InputSerializer, responses={200: dict})
    def patch(self, request: Request, deployment_id: str) -> Response:
        deployment = self._deployment(deployment_id)
        data = validated(self.InputSerializer, request.data)
        deployment = deployments.deployment_update(
            deployment=deployment,
            min_replicas=data.get("min_replicas"),
            max_replicas=data.get("max_replicas"),
        )
        return Response(deployment_out(deployment))

    @extend_schema(responses={200: dict})
    def delete(self, request: Request, deployment_id: str) -> Response:
        deployment = deployments.deployment_delete(deployment=self._deployment(deployment_id))
        return Response({"id": deployment.pk, "object": "deployment", "deleted": True})


def _time(request: Request, name: str) -> datetime | None:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return None
    try:
        return datetime.fromtimestamp(int(raw), tz=UTC)
    except (ValueError, OverflowError, OSError):
        raise ApiError(
            f"'{name}' must be a Unix time in seconds.", param=name, code="invalid_value"
        ) from None


class InferenceUsageListApi(OrganizationApi):
    """Every inference request's usage, newest first: the raw ledger billing prices."""

    scopes = {"read": "billing.read"}

    @extend_schema(
        operation_id="list_inference_usage",
        parameters=[
            OpenApiParameter("start_time", int, description="Unix seconds, inclusive."),
            OpenApiParameter("end_time", int, description="Unix seconds, exclusive."),
            OpenApiParameter("model", str),
            OpenApiParameter("api_key_id", str),
            OpenApiParameter("after", str),
            OpenApiParameter("limit", int),
        ],
        responses={200: dict},
    )
    def get(self, request: Request) -> Response:
        queryset = usage.usage_for_organization(
            self.organization,
            start=_time(request, "start_time"),
            end=_time(request, "end_time"),
            model=request.query_params.get("model") or None,
            api_key_id=request.query_params.get("api_key_id") or None,
        )
        rows, has_more = paginate(queryset, request)
        return list_response(rows, has_more, usage_out)
