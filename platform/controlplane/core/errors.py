"""Errors in OpenAI's shape, everywhere under /v1/.

`{"error": {"message", "type", "param", "code"}}` with the right status. Clients
built for OpenAI (the official SDKs) map these onto their own exception classes,
so a message must tell the user what to change.
"""

from __future__ import annotations

from typing import Any

import structlog
from django.core.exceptions import PermissionDenied, RequestDataTooBig
from django.http import Http404, HttpRequest, JsonResponse
from rest_framework import exceptions, status
from rest_framework.response import Response

log = structlog.get_logger(__name__)

_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    402: "billing_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    501: "server_error",
    503: "server_error",
}


def error_body(
    message: str, *, status_code: int, code: str | None = None, param: str | None = None
) -> dict[str, Any]:
    return {
        "error": {
            "message": message,
            "type": _TYPE_BY_STATUS.get(status_code, "invalid_request_error"),
            "param": param,
            "code": code,
        }
    }


class ApiError(exceptions.APIException):
    """An error a view raises on purpose, with an OpenAI-style code and param."""

    status_code: int = status.HTTP_400_BAD_REQUEST
    default_code = "invalid_request"

    def __init__(
        self,
        message: str,
        *,
        status_code: int | None = None,
        code: str | None = None,
        param: str | None = None,
    ) -> None:
        super().__init__(detail=message, code=code or self.default_code)
        if status_code is not None:
            self.status_code = status_code
        self.code = code or self.default_code
        self.param = param


class Unavailable(ApiError):
    """503: the service cannot take the request now; `Retry-After` says when to retry."""

    status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    default_code = "service_unavailable"

    def __init__(self, message: str, *, code: str | None = None, retry_after: int = 1) -> None:
        super().__init__(message, code=code)
        self.retry_after = retry_after


class Conflict(ApiError):
    status_code = status.HTTP_409_CONFLICT
    default_code = "conflict"


class NotFound(ApiError):
    status_code = status.HTTP_404_NOT_FOUND
    default_code = "not_found"


class MissingScope(ApiError):
    status_code = status.HTTP_403_FORBIDDEN
    default_code = "missing_scope"


def _first_validation_error(detail: Any, path: str = "") -> tuple[str | None, str]:
    """Flatten DRF's nested validation errors to (param, message) of the first one."""
    if isinstance(detail, dict):
        for key, value in detail.items():
            name = path if key == "non_field_errors" else f"{path}.{key}" if path else str(key)
            return _first_validation_error(value, name)
    if isinstance(detail, list) and detail:
        first = detail[0]
        if isinstance(first, dict | list):
            return _first_validation_error(first, f"{path}[0]" if path else path)
        return (path or None), str(first)
    return (path or None), str(detail)


_CODE_BY_EXCEPTION: dict[type[exceptions.APIException], str] = {
    exceptions.NotAuthenticated: "missing_api_key",
    exceptions.AuthenticationFailed: "invalid_api_key",
    exceptions.PermissionDenied: "permission_denied",
    exceptions.NotFound: "not_found",
    exceptions.MethodNotAllowed: "method_not_allowed",
    exceptions.UnsupportedMediaType: "unsupported_media_type",
    exceptions.ParseError: "invalid_json",
    exceptions.Throttled: "rate_limit_exceeded",
    exceptions.ValidationError: "invalid_value",
}


def exception_handler(exc: Exception, context: dict[str, Any]) -> Response:
    """DRF exception handler: every error, including unhandled ones, in OpenAI's shape."""
    status_code, body, headers = error_parts(exc)
    return Response(body, status=status_code, headers=headers)


def error_parts(exc: Exception) -> tuple[int, dict[str, Any], dict[str, str]]:
    """Any exception as (status, OpenAI-shaped body, headers): for DRF views and for
    the ASGI inference path alike."""
    if isinstance(exc, Http404):
        exc = exceptions.NotFound()
    elif isinstance(exc, PermissionDenied):
        exc = exceptions.PermissionDenied()
    elif isinstance(exc, RequestDataTooBig):
        return 413, error_body(str(exc), status_code=413, code="request_too_large"), {}

    if not isinstance(exc, exceptions.APIException):
        log.exception("api.unhandled_exception", exc_type=type(exc).__name__)
        body = error_body(
            "The server had an error while processing your request. "
            "Retry, and quote the x-request-id header if it persists.",
            status_code=500,
            code="internal_error",
        )
        return 500, body, {}

    # OpenAI's SDKs retry 409s (and 429s, 5xx) unless told not to: a deliberate
    # conflict will not resolve itself, so say so instead of tripling the traffic.
    headers: dict[str, str] = {"x-should-retry": "false"} if exc.status_code == 409 else {}
    more = getattr(exc, "headers", None)
    if callable(more):  # e.g. a rate limit's x-ratelimit-* state at the refusal
        headers.update(more())
    retry_after = getattr(exc, "retry_after", None)
    if retry_after is not None:  # 429 and 503: when to come back (the SDKs honour it)
        headers["Retry-After"] = str(int(retry_after))
    param: str | None = None
    if isinstance(exc, ApiError):
        message, code, param = str(exc.detail), exc.code, exc.param
    elif isinstance(exc, exceptions.ValidationError):
        param, message = _first_validation_error(exc.detail)
        if param:
            message = f"Invalid '{param}': {message}"
        code = "invalid_value"
    else:
        message = str(exc.detail)
        given = exc.get_codes()
        code = (
            given
            if isinstance(given, str) and given != exc.default_code
            else next(
                (c for cls, c in _CODE_BY_EXCEPTION.items() if isinstance(exc, cls)),
                str(exc.default_code),
            )
        )
    wait = getattr(exc, "wait", None)
    if isinstance(exc, exceptions.Throttled) and wait is not None:
        headers["Retry-After"] = str(max(1, round(wait)))
    auth_header = getattr(exc, "auth_header", None)
    if auth_header:
        headers["WWW-Authenticate"] = auth_header
    body = error_body(message, status_code=exc.status_code, code=code, param=param)
    return exc.status_code, body, headers


def _json_error(request: HttpRequest, message: str, status_code: int, code: str) -> JsonResponse:
    return JsonResponse(error_body(message, status_code=status_code, code=code), status=status_code)


def handler400(request: HttpRequest, exception: Exception | None = None) -> JsonResponse:
    return _json_error(request, "Bad request.", 400, "bad_request")


def handler403(request: HttpRequest, exception: Exception | None = None) -> JsonResponse:
    return _json_error(request, "You do not have access to this resource.", 403, "forbidden")


def handler404(request: HttpRequest, exception: Exception | None = None) -> JsonResponse:
    return _json_error(
        request,
        f"Unknown URL: {request.method} {request.path}. See /docs for the API reference.",
        404,
        "unknown_url",
    )


def handler500(request: HttpRequest) -> JsonResponse:
    return _json_error(
        request,
        "The server had an error while processing your request. "
        "Retry, and quote the x-request-id header if it persists.",
        500,
        "internal_error",
    )
