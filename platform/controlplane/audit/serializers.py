"""The output shape of an audit log entry (OpenAI's `organization.audit_log`)."""

from __future__ import annotations

from typing import Any

from .models import AuditLog


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
