"""Append-only record of every change to who can access an organization."""

from __future__ import annotations

from django.db import models

from controlplane.core.ids import new_audit_id
from controlplane.core.scoping import OrganizationOwned, OrganizationScopedManager


class ActorType(models.TextChoices):
    USER = "user"  # a member, through a key bound to them
    API_KEY = "api_key"  # a service key with no member
    STAFF = "staff"  # platform staff, through the Django admin
    SYSTEM = "system"


class AuditLog(OrganizationOwned):
    id = models.CharField(primary_key=True, max_length=40, default=new_audit_id, editable=False)
    action = models.CharField(max_length=64, db_index=True)
    actor_type = models.CharField(max_length=16, choices=ActorType.choices)
    actor_id = models.CharField(max_length=40, blank=True)
    actor_email = models.CharField(max_length=254, blank=True)
    api_key_id = models.CharField(max_length=40, blank=True)
    target_type = models.CharField(max_length=32)
    target_id = models.CharField(max_length=40, blank=True)
    details = models.JSONField(default=dict, blank=True)
    ip_address = models.GenericIPAddressField(null=True, blank=True)
    user_agent = models.CharField(max_length=400, blank=True)
    request_id = models.CharField(max_length=128, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    objects = OrganizationScopedManager["AuditLog"]()

    class Meta(OrganizationOwned.Meta):
        indexes = [models.Index(fields=["organization", "-id"], name="audit_org_id")]

    def __str__(self) -> str:
        who = self.actor_email or self.actor_id or self.actor_type
        return f"{self.action} by {who} ({self.created_at:%Y-%m-%d %H:%M})"
