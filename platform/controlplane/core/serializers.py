"""Input validation shared by every endpoint."""

from __future__ import annotations

import threading
from datetime import datetime
from typing import Any

from django.core.exceptions import ValidationError as DjangoValidationError
from rest_framework import serializers


class StrictInputSerializer(serializers.Serializer[Any]):
    """Refuses fields it does not declare.

    An unknown field is a 400 naming it, so a client that tries to set
    `organization`, `role` or `is_staff` where it may not (mass assignment), or
    that misspells a field, learns so instead of being silently ignored.
    """

    def to_internal_value(self, data: Any) -> Any:
        if isinstance(data, dict):
            unknown = sorted(set(data) - set(self.fields))
            if unknown:
                raise serializers.ValidationError(
                    {unknown[0]: [f"Unknown field. Accepted fields: {', '.join(self.fields)}."]}
                )
        return super().to_internal_value(data)

    def create(self, validated_data: Any) -> Any:  # input only: services write
        raise NotImplementedError

    def update(self, instance: Any, validated_data: Any) -> Any:
        raise NotImplementedError


def unix(value: datetime | None) -> int | None:
    """Timestamps go out as Unix seconds, as in OpenAI's API."""
    return int(value.timestamp()) if value is not None else None


def validated(serializer_class: type[serializers.Serializer[Any]], data: Any) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise serializers.ValidationError(
            {"non_field_errors": ["The request body must be a JSON object."]}
        )
    serializer = serializer_class(data=data)
    serializer.is_valid(raise_exception=True)
    return dict(serializer.validated_data)


_reusable = threading.local()


def validated_reusing(
    serializer_class: type[serializers.Serializer[Any]], data: Any
) -> dict[str, Any]:
    """`validated`, with one serializer instance per class and thread, reused.

    A DRF serializer deep-copies all its declared fields each time one is made:
    measured, that was most of the cost of validating an inference request (the
    hot path). Validation itself keeps no state on the instance when run through
    `run_validation`, so one instance per thread gives the same answers.
    """
    if not isinstance(data, dict):
        raise serializers.ValidationError(
            {"non_field_errors": ["The request body must be a JSON object."]}
        )
    cache: dict[type[Any], serializers.Serializer[Any]] = _reusable.__dict__.setdefault(
        "serializers", {}
    )
    serializer = cache.get(serializer_class)
    if serializer is None:
        serializer = cache[serializer_class] = serializer_class()
    try:
        value = serializer.run_validation(data)
    except (serializers.ValidationError, DjangoValidationError) as exc:
        raise serializers.ValidationError(detail=serializers.as_serializer_error(exc)) from None
    return dict(value)
