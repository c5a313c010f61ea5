from __future__ import annotations

from django.contrib import admin

from controlplane.audit.admin import AuditedAdmin

from .models import Invitation, Membership, Organization


class MembershipInline(admin.TabularInline[Membership, Organization]):
    model = Membership
    extra = 0
    fields = ("user", "role", "created_at")
    readonly_fields = ("user", "role", "created_at")
    can_delete = False
    show_change_link = True

    def has_add_permission(self, request, obj=None):  # type: ignore[no-untyped-def]
        return False


@admin.register(Organization)
class OrganizationAdmin(AuditedAdmin):
    audit_target_type = "organization"
    list_display = ("name", "id", "is_customer", "is_data_partner", "created_at")
    list_filter = ("is_customer", "is_data_partner", "created_at")
    search_fields = ("name", "id", "memberships__user__email")
    readonly_fields = ("id", "created_at", "updated_at")
    inlines = [MembershipInline]


@admin.register(Membership)
class MembershipAdmin(AuditedAdmin):
    audit_target_type = "member"
    list_display = ("user", "organization", "role", "created_at")
    list_filter = ("role",)
    search_fields = ("user__email", "organization__name", "organization__id", "id")
    list_select_related = ("user", "organization")
    autocomplete_fields = ("user", "organization")
    readonly_fields = ("id", "created_at", "updated_at")


@admin.register(Invitation)
class InvitationAdmin(AuditedAdmin):
    audit_target_type = "invitation"
    list_display = ("email", "organization", "role", "status", "expires_at", "created_at")
    list_filter = ("status", "role")
    search_fields = ("email", "organization__name", "organization__id")
    list_select_related = ("organization",)
    readonly_fields = ("id", "token_hash", "invited_by", "accepted_at", "created_at")
    exclude = ("token_hash",)
