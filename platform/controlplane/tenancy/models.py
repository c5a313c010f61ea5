"""Organizations (tenants), their members and invitations."""

from __future__ import annotations

from django.conf import settings
from django.db import models
from django.db.models.functions import Lower

from controlplane.core.ids import new_invite_id, new_member_id, new_org_id
from controlplane.core.scoping import OrganizationOwned, OrganizationScopedManager

from .roles import Role

#: What an organization can be: a customer, a data partner, or both.
ORGANIZATION_KINDS = ("customer", "data_partner")


class Organization(models.Model):
    """A tenant. A customer, a data partner, or both."""

    id = models.CharField(primary_key=True, max_length=40, default=new_org_id, editable=False)
    name = models.CharField(max_length=200)
    is_customer = models.BooleanField(default=True)
    is_data_partner = models.BooleanField(default=False)
    #: The commercial plan: sets limits such as concurrent fine-tuning jobs (settings.PLANS).
    plan = models.CharField(max_length=32, default="free")
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.name} ({self.id})"

    @property
    def kinds(self) -> list[str]:
        kinds = []
        if self.is_customer:
            kinds.append("customer")
        if self.is_data_partner:
            kinds.append("data_partner")
        return kinds


class Membership(OrganizationOwned):
    id = models.CharField(primary_key=True, max_length=40, default=new_member_id, editable=False)
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="memberships"
    )
    role = models.CharField(max_length=16, choices=Role.choices, default=Role.DEVELOPER)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    objects = OrganizationScopedManager["Membership"]()

    class Meta(OrganizationOwned.Meta):
        constraints = [
            models.UniqueConstraint(fields=["organization", "user"], name="one_membership_per_user")
        ]

    def __str__(self) -> str:
        return f"{self.user_id} is {self.role} of {self.organization_id}"


class InvitationStatus(models.TextChoices):
    PENDING = "pending"
    ACCEPTED = "accepted"
    REVOKED = "revoked"


class Invitation(OrganizationOwned):
    """An invitation to join an organization; accepted with the token sent by email."""

    id = models.CharField(primary_key=True, max_length=40, default=new_invite_id, editable=False)
    email = models.EmailField()
    role = models.CharField(max_length=16, choices=Role.choices, default=Role.DEVELOPER)
    token_hash = models.CharField(max_length=64, unique=True, editable=False)
    status = models.CharField(
        max_length=16, choices=InvitationStatus.choices, default=InvitationStatus.PENDING
    )
    invited_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    expires_at = models.DateTimeField()
    accepted_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    objects = OrganizationScopedManager["Invitation"]()

    class Meta(OrganizationOwned.Meta):
        constraints = [
            models.UniqueConstraint(
                "organization",
                Lower("email"),
                condition=models.Q(status="pending"),
                name="one_pending_invitation_per_email",
            )
        ]

    def __str__(self) -> str:
        return f"{self.email} → {self.organization_id} as {self.role} ({self.status})"
