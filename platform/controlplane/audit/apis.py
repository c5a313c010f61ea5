"""`/v1/organization/audit_logs`: who changed access, what, when and from where."""

from __future__ import annotations

from typing import Any

from drf_spectacular.utils import extend_schema
from rest_framework.request import Request
from rest_framework.response import Response

from controlplane.core.pagination import list_response, paginate
from controlplane.tenancy.apis_base import OrganizationApi

from .models import AuditLog

_FILTERS = {"action": "action", "actor_id": "actor_id", "target_id": "target_id"}


def audit_log_out(entry: AuditLog) -> dict[str, Any]:
    return {
        "object": "organization.audit_log",
        "id": entry.pk,
        "type": entry.action,
        "effective_at": int(entry.created_at.timestamp()),
        "actor": {
            "type": entry.actor_type,
            "id": entry.actor_id or None,
            "email": entry.actor_email or None,
            "api_key_id": entry.api_key_id or None,
            "ip_address": entry.ip_address,
            "user_agent": entry.user_agent or None,
        },
        "target": {"type": entry.target_type, "id": entry.target_id or None},
        "details": entry.details,
        "request_id": entry.request_id or None,
    }


class AuditLogListApi(OrganizationApi):
    scopes = {"read": "audit_logs.read"}

    @extend_schema(responses={200: dict})
    def get(self, request: Request) -> Response:
        queryset = AuditLog.objects.for_organization(self.organization)
        for param, field in _FILTERS.items():
            value = request.query_params.get(param)
            if value:
                queryset = queryset.filter(**{field: value})
        rows, has_more = paginate(queryset, request)
        return list_response(rows, has_more, audit_log_out)
