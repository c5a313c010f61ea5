"""Input validation shared by every endpoint."""

from __future__ import annotations

from datetime import datetime
from typing import Any

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
