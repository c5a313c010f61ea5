from __future__ import annotations

from django.contrib import admin, messages
from django.contrib.auth.admin import UserAdmin as DjangoUserAdmin
from django.db.models import QuerySet
from django.http import HttpRequest

from controlplane.audit.admin import AuditedAdmin
from controlplane.audit.services import Actor

from .models import APIKey, User
from .services import api_key_revoke


@admin.register(User)
class UserAdmin(DjangoUserAdmin[User]):
    ordering = ("email",)
    list_display = ("email", "name", "is_staff", "is_active", "date_joined")
    list_filter = ("is_staff", "is_superuser", "is_active")
    search_fields = ("email", "name", "id")
    fieldsets = (
        (None, {"fields": ("email", "password")}),
        ("Profile", {"fields": ("name",)}),
        (
            "Permissions",
            {"fields": ("is_active", "is_staff", "is_superuser", "groups", "user_permissions")},
        ),
        ("Dates", {"fields": ("last_login", "date_joined")}),
    )
    add_fieldsets = ((None, {"classes": ("wide",), "fields": ("email", "password1", "password2")}),)


@admin.register(APIKey)
class APIKeyAdmin(AuditedAdmin):
    """Keys are shown by prefix and status only: the hash and the secret never appear."""

    audit_target_type = "api_key"
    list_display = (
        "name",
        "redacted_value",
        "organization",
        "member",
        "status",
        "created_at",
        "last_used_at",
        "expires_at",
    )
    list_filter = ("revoked_at", "created_at", "expires_at")
    search_fields = (
        "name",
        "prefix",
        "id",
        "organization__name",
        "organization__id",
        "member__user__email",
    )
    list_select_related = ("organization", "member__user")
    fields = (
        "id",
        "name",
        "organization",
        "member",
        "redacted_value",
        "scopes",
        "status",
        "created_by",
        "created_at",
        "last_used_at",
        "expires_at",
        "revoked_at",
        "rotated_at",
        "rotated_to",
    )
    readonly_fields = tuple(f for f in fields if f not in {"name", "expires_at"})
    actions = ["revoke_keys"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        # Keys are issued through the API, where the secret is shown to its owner once.
        return False

    @admin.action(description="Revoke selected API keys now")
    def revoke_keys(self, request: HttpRequest, queryset: QuerySet[APIKey]) -> None:
        actor = Actor.from_request(request)
        live = list(queryset.filter(revoked_at__isnull=True))
        for key in live:
            # Staff act outside any organization role; audited, with the staff user as actor.
            api_key_revoke(api_key=key, principal=None, actor=actor)
        self.message_user(request, f"Revoked {len(live)} key(s).", messages.SUCCESS)
