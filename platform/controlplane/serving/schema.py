"""The four inference endpoints as the OpenAPI schema declares them.

These DRF views are declarations only: drf-spectacular documents the URLs it finds in
the URL map, with the request serializer, scope and error responses each names here.
They never serve: under ASGI the serving router (`router.py`) answers these POSTs
before Django sees them, and a request that reaches Django anyway (a WSGI server, the
Django test client) is refused with a 503 rather than served a second way. Views
rather than a schema hook because they reuse what every other endpoint's schema
comes from (the security scheme of the key authentication, serializer components,
the scopes), and the URL names stay reversible.
"""

from __future__ import annotations

from drf_spectacular.utils import OpenApiResponse, extend_schema, inline_serializer
from rest_framework import serializers
from rest_framework.parsers import JSONParser
from rest_framework.request import Request
from rest_framework.response import Response

from controlplane.core.errors import Unavailable
from controlplane.tenancy.apis_base import OrganizationApi

from . import inputs

_ERROR = inline_serializer(
    "Error",
    {
        "error": inline_serializer(
            "ErrorDetail",
            {
                "message": serializers.CharField(),
                "type": serializers.CharField(),
                "param": serializers.CharField(allow_null=True),
                "code": serializers.CharField(allow_null=True),
            },
        )
    },
)


def _errors(*statuses: tuple[int, str]) -> dict[int, OpenApiResponse]:
    return {status: OpenApiResponse(_ERROR, description=what) for status, what in statuses}


#: What any of the four can answer besides 200, OpenAI's error shape every time.
ERRORS = _errors(
    (400, "Invalid request: the field is named in `param`."),
    (401, "No API key, or one that does not verify."),
    (402, "The organization is suspended for an unpaid invoice (`billing_suspended`)."),
    (403, "The key lacks the `inference` scope."),
    (404, "No such model for this organization."),
    (413, "The body is over the size limit."),
    (415, "The body is not JSON."),
    (429, "A rate limit (`rate_limit_exceeded`) or a hard budget (`insufficient_quota`)."),
    (503, "No capacity or the broker did not answer; retry after `Retry-After`."),
)


class _InferenceSchemaApi(OrganizationApi):
    """Declared, never served here: see the module docstring."""

    scopes = {"read": "inference", "write": "inference"}
    parser_classes = [JSONParser]

    def _refuse(self) -> Response:
        raise Unavailable(
            "Inference is served by the ASGI front door (`atelier web`), not through this "
            "Django view."
        )


class ChatCompletionsApi(_InferenceSchemaApi):
    @extend_schema(
        request=inputs.ChatInput,
        responses={200: dict, **ERRORS},
        operation_id="create_chat_completion",
        description="A chat completion, or its server-sent events with `stream: true`.",
    )
    def post(self, request: Request) -> Response:
        return self._refuse()


class CompletionsApi(_InferenceSchemaApi):
    @extend_schema(
        request=inputs.CompletionInput,
        responses={200: dict, **ERRORS},
        operation_id="create_completion",
        description="A text completion, or its server-sent events with `stream: true`.",
    )
    def post(self, request: Request) -> Response:
        return self._refuse()


class EmbeddingsApi(_InferenceSchemaApi):
    @extend_schema(
        request=inputs.EmbeddingInput,
        responses={200: dict, **ERRORS},
        operation_id="create_embedding",
        description="Embedding vectors of the inputs (floats, or base64 little-endian f32).",
    )
    def post(self, request: Request) -> Response:
        return self._refuse()


class ClassificationsApi(_InferenceSchemaApi):
    @extend_schema(
        request=inputs.ClassificationInput,
        responses={200: dict, **ERRORS},
        operation_id="create_classification",
        description="Our extension for classifier fine-tunes: labels with scores.",
    )
    def post(self, request: Request) -> Response:
        return self._refuse()
