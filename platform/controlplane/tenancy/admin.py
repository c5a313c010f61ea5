"""Staff views of organizations, members and invitations.

The Organization admin registered here is the tenancy part; payments' admin (above
billing and payments in the layers) re-registers it with the columns and actions that
need them: standing, credit, plan, suspend/restore, grant credit (payments/admin.py).
"""

from __future__ import annotations

from typing import Any

from django.contrib import admin, messages
from django.db.models import Count, QuerySet
from django.http import HttpRequest

from controlplane.audit.admin import AuditedAdmin, count_of
from controlplane.audit.services import Actor
from controlplane.core.errors import ApiError

from . import services
from .models import Invitation, InvitationStatus, Membership, Organization


class MembershipInline(admin.TabularInline[Membership, Organization]):
    model = Membership
    extra = 0
    fields = ("user", "user_name", "role", "created_at")
    readonly_fields = ("user", "user_name", "role", "created_at")
    can_delete = False
    show_change_link = True

    def get_queryset(self, request: HttpRequest) -> QuerySet[Membership]:
        return super().get_queryset(request).select_related("user")

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    @admin.display(description="Name")
    def user_name(self, obj: Membership) -> str:
        return obj.user.name


@admin.register(Organization)
class OrganizationAdmin(AuditedAdmin):
    audit_target_type = "organization"
    list_display = (
        "name",
        "id",
        "plan",
        "members",
        "is_customer",
        "is_data_partner",
        "created_at",
    )
    list_filter = ("plan", "is_customer", "is_data_partner", "created_at")
    search_fields = ("name", "id", "memberships__user__email")
    date_hierarchy = "created_at"
    # The plan changes through an action (it keeps the plan history invoicing prorates on).
    readonly_fields = ("id", "plan", "created_at", "updated_at")
    inlines = [MembershipInline]

    def get_queryset(self, request: HttpRequest) -> QuerySet[Organization]:
        queryset: QuerySet[Organization] = super().get_queryset(request)
        return queryset.annotate(member_count=count_of(Membership._plain.all(), "organization"))

    @admin.display(description="Members", ordering="member_count")
    def members(self, obj: Any) -> int:
        return int(obj.member_count)


@admin.register(Membership)
class MembershipAdmin(AuditedAdmin):
    audit_target_type = "member"
    list_display = ("user", "user_name", "organization", "role", "api_keys", "created_at")
    list_filter = ("role", "created_at")
    search_fields = ("user__email", "user__name", "organization__name", "organization__id", "id")
    list_select_related = ("user", "organization")
    autocomplete_fields = ("user", "organization")
    readonly_fields = ("id", "created_at", "updated_at")

    def get_queryset(self, request: HttpRequest) -> QuerySet[Membership]:
        # The member's keys (accounts' reverse relation), counted in the list query.
        queryset: QuerySet[Membership] = super().get_queryset(request)
        return queryset.annotate(key_count=Count("api_keys", distinct=True))

    @admin.display(description="Name", ordering="user__name")
    def user_name(self, obj: Membership) -> str:
        return obj.user.name

    @admin.display(description="API keys", ordering="key_count")
    def api_keys(self, obj: Any) -> int:
        return int(obj.key_count)


@admin.register(Invitation)
class InvitationAdmin(AuditedAdmin):
    """Invitations are sent through the API (the token goes only to the invitee's address);
    staff find them and revoke them."""

    audit_target_type = "invitation"
    list_display = (
        "email",
        "organization",
        "role",
        "status",
        "invited_by",
        "expires_at",
        "created_at",
    )
    list_filter = ("status", "role", "created_at")
    search_fields = ("email", "organization__name", "organization__id")
    list_select_related = ("organization", "invited_by")
    date_hierarchy = "created_at"
    fields = (
        "id",
        "organization",
        "email",
        "role",
        "status",
        "invited_by",
        "expires_at",
        "accepted_at",
        "created_at",
    )
    readonly_fields = fields
    actions = ["revoke_invitations"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    @admin.action(description="Revoke selected pending invitations", permissions=["change"])
    def revoke_invitations(self, request: HttpRequest, queryset: QuerySet[Invitation]) -> None:
        actor = Actor.from_request(request)
        done = 0
        for invitation in queryset.filter(status=InvitationStatus.PENDING):
            try:
                services.invitation_revoke(invitation=invitation, actor=actor)
            except ApiError as exc:  # revoked or accepted meanwhile
                self.message_user(request, f"{invitation.email}: {exc.detail}", messages.ERROR)
                continue
            done += 1
        self.message_user(request, f"Revoked {done} invitation(s).", messages.SUCCESS)
