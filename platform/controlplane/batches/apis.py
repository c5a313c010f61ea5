"""`/v1/batches`, in OpenAI's shapes: create, retrieve, list, cancel."""

from __future__ import annotations

from typing import Any

from drf_spectacular.utils import extend_schema
from rest_framework import serializers
from rest_framework.request import Request
from rest_framework.response import Response

from controlplane.core.pagination import list_response, paginate
from controlplane.core.serializers import StrictInputSerializer, unix, validated
from controlplane.datasets.models import File
from controlplane.datasets.requests_format import BATCH_URLS
from controlplane.tenancy.apis_base import OrganizationApi

from . import services
from .models import COMPLETION_WINDOWS, Batch


def batch_out(batch: Batch) -> dict[str, Any]:
    return {
        "id": batch.pk,
        "object": "batch",
        "endpoint": batch.endpoint,
        "errors": batch.errors,
        "input_file_id": batch.input_file_id,
        "completion_window": batch.completion_window,
        "status": batch.status,
        "output_file_id": batch.output_file_id,
        "error_file_id": batch.error_file_id,
        "created_at": unix(batch.created_at),
        "in_progress_at": unix(batch.in_progress_at),
        "expires_at": unix(batch.expires_at),
        "finalizing_at": unix(batch.finalizing_at),
        "completed_at": unix(batch.completed_at),
        "failed_at": unix(batch.failed_at),
        "expired_at": unix(batch.expired_at),
        "cancelling_at": unix(batch.cancelling_at),
        "cancelled_at": unix(batch.cancelled_at),
        "request_counts": {
            "total": batch.total,
            "completed": batch.completed,
            "failed": batch.failed,
        },
        "metadata": batch.metadata,
    }


class BatchesApi(OrganizationApi):
    scopes = {"read": "inference", "write": "inference"}

    def _batch(self, batch_id: str) -> Batch:
        return self.get_owned(Batch, batch_id, label="batch")


class BatchListCreateApi(BatchesApi):
    class InputSerializer(StrictInputSerializer):
        input_file_id = serializers.CharField(max_length=40)
        endpoint = serializers.ChoiceField(BATCH_URLS)
        completion_window = serializers.ChoiceField(COMPLETION_WINDOWS)
        metadata = serializers.DictField(
            child=serializers.CharField(max_length=512, allow_blank=True),
            required=False,
            allow_null=True,
        )

        def validate_metadata(self, value: dict[str, str] | None) -> dict[str, str] | None:
            if value is not None and (len(value) > 16 or any(len(k) > 64 for k in value)):
                raise serializers.ValidationError("At most 16 keys of at most 64 characters.")
            return value

    @extend_schema(responses={200: dict}, operation_id="list_batches")
    def get(self, request: Request) -> Response:
        rows, has_more = paginate(Batch.objects.for_organization(self.organization), request)
        return list_response(rows, has_more, batch_out)

    @extend_schema(request=InputSerializer, responses={200: dict})
    def post(self, request: Request) -> Response:
        data = validated(self.InputSerializer, request.data)
        file = self.get_owned(File, data["input_file_id"], label="file", deleted_at__isnull=True)
        principal: Any = self.principal
        key = getattr(principal, "api_key", None)
        batch = services.batch_create(
            organization=self.organization,
            input_file=file,
            endpoint=data["endpoint"],
            completion_window=data["completion_window"],
            metadata=data.get("metadata"),
            api_key_id=getattr(key, "pk", None),
            user_id=principal.user.pk if principal.user else None,
        )
        return Response(batch_out(batch), status=200)


class BatchDetailApi(BatchesApi):
    @extend_schema(responses={200: dict})
    def get(self, request: Request, batch_id: str) -> Response:
        return Response(batch_out(self._batch(batch_id)))


class BatchCancelApi(BatchesApi):
    @extend_schema(request=None, responses={200: dict})
    def post(self, request: Request, batch_id: str) -> Response:
        batch = services.batch_cancel(batch=self._batch(batch_id))
        return Response(batch_out(batch))
