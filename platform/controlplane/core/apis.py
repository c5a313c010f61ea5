"""Public, unauthenticated endpoints of the API itself."""

from __future__ import annotations

from typing import Any

from django.http import HttpRequest, JsonResponse
from drf_spectacular.utils import extend_schema
from rest_framework.permissions import AllowAny
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from .errors import handler404


class StatusApi(APIView):
    """`GET /v1/status`: the API answers (no key needed)."""

    authentication_classes: list[Any] = []
    permission_classes = [AllowAny]

    @extend_schema(responses={200: dict}, auth=[])
    def get(self, request: Request) -> Response:
        return Response({"object": "status", "status": "ok", "api_version": "v1"})


def unknown_url(request: HttpRequest, path: str = "") -> JsonResponse:
    """Any other /v1/ URL: a JSON 404 even when DEBUG would render an HTML page."""
    return handler404(request)
