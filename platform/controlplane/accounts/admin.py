"""Staff views of users and API keys. A key is shown by its prefix and last four characters
only: neither its secret nor its hash is ever on a page (not a field, a column or a search)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from django.contrib import admin, messages
from django.contrib.admin.utils import unquote
from django.contrib.auth.admin import UserAdmin as DjangoUserAdmin
from django.db import transaction
from django.db.models import Q, QuerySet
from django.forms import ModelForm
from django.http import HttpRequest, HttpResponse
from django.utils import timezone

from controlplane.audit.admin import AuditedAdmin, count_of, staff_audit
from controlplane.audit.services import Actor
from controlplane.tenancy.models import Membership

from .models import APIKey, User
from .services import api_key_revoke


class UserMembershipInline(admin.TabularInline[Membership, User]):
    model = Membership
    fk_name = "user"
    extra = 0
    fields = ("organization", "role", "created_at")
    readonly_fields = fields
    can_delete = False
    show_change_link = True

    def get_queryset(self, request: HttpRequest) -> QuerySet[Membership]:
        return super().get_queryset(request).select_related("organization")

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(User)
class UserAdmin(DjangoUserAdmin[User]):
    """Changes to a user are recorded in the audit log of every organization they belong to
    (a staff user with no organization is recorded in the admin's own history only)."""

    ordering = ("email",)
    list_display = (
        "email",
        "name",
        "organizations",
        "is_staff",
        "is_active",
        "last_login",
        "date_joined",
    )
    list_filter = ("is_staff", "is_superuser", "is_active", "groups", "date_joined")
    search_fields = ("email", "name", "id", "memberships__organization__name")
    date_hierarchy = "date_joined"
    inlines = [UserMembershipInline]
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

    def get_queryset(self, request: HttpRequest) -> QuerySet[User]:
        return (
            super()
            .get_queryset(request)
            .annotate(organization_count=count_of(Membership._plain.all(), "user"))
        )

    @admin.display(description="Organizations", ordering="organization_count")
    def organizations(self, obj: Any) -> int:
        return int(obj.organization_count)

    def _audit(self, request: HttpRequest, user: User, verb: str, details: dict[str, Any]) -> None:
        for org_id in Membership._plain.filter(user=user).values_list("organization_id", flat=True):
            staff_audit(
                request,
                organization=org_id,
                action=f"admin.user.{verb}",
                target=user,
                details=details,
            )

    @transaction.atomic
    def save_model(
        self, request: HttpRequest, obj: User, form: ModelForm[User], change: bool
    ) -> None:
        super().save_model(request, obj, form, change)
        if change:
            # Field names and new values, never a password (its hash is not a detail).
            changed = {
                name: str(form.cleaned_data.get(name))
                for name in form.changed_data
                if not name.startswith("password")
            }
            self._audit(request, obj, "changed", changed)

    @transaction.atomic
    def delete_model(self, request: HttpRequest, obj: User) -> None:
        self._audit(request, obj, "deleted", {"email": obj.email})
        super().delete_model(request, obj)

    def user_change_password(
        self, request: HttpRequest, id: str, form_url: str = ""
    ) -> HttpResponse:
        response = super().user_change_password(request, id, form_url)
        if request.method == "POST" and response.status_code == 302:
            user = self.get_object(request, unquote(id))
            if user is not None:
                self._audit(request, user, "password_changed", {})
        return response


class KeyStatusFilter(admin.SimpleListFilter):
    """The key's status as the API shows it (revoked, expired, rotating, active)."""

    title = "status"
    parameter_name = "status"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [(s, s) for s in ("active", "rotating", "expired", "revoked")]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        now: datetime = timezone.now()
        live = Q(revoked_at__isnull=True)
        unexpired = Q(expires_at__isnull=True) | Q(expires_at__gt=now)
        conditions = {
            "active": live & unexpired & Q(rotated_at__isnull=True),
            "rotating": live & unexpired & Q(rotated_at__isnull=False),
            "expired": live & Q(expires_at__lte=now),
            "revoked": ~live,
        }
        value = self.value()
        return queryset.filter(conditions[value]) if value in conditions else queryset


@admin.register(APIKey)
class APIKeyAdmin(AuditedAdmin):
    """Keys are shown by prefix and status only: the hash and the secret never appear."""

    audit_target_type = "api_key"
    list_display = (
        "name",
        "redacted_value",
        "organization",
        "member_email",
        "status",
        "scope_list",
        "created_at",
        "last_used_at",
        "expires_at",
    )
    list_filter = (KeyStatusFilter, "created_at", "last_used_at")
    search_fields = (
        "name",
        "prefix",
        "id",
        "organization__name",
        "organization__id",
        "member__user__email",
    )
    list_select_related = ("organization", "member__user")
    date_hierarchy = "created_at"
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

    @admin.display(description="Member", ordering="member__user__email")
    def member_email(self, obj: APIKey) -> str:
        return obj.member.user.email if obj.member is not None else "(service key)"

    @admin.display(description="Scopes")
    def scope_list(self, obj: APIKey) -> str:
        return ", ".join(obj.scopes) if obj.scopes else "-"

    @admin.action(description="Revoke selected API keys now", permissions=["change"])
    def revoke_keys(self, request: HttpRequest, queryset: QuerySet[APIKey]) -> None:
        actor = Actor.from_request(request)
        live = list(queryset.filter(revoked_at__isnull=True))
        for key in live:
            # Staff act outside any organization role; audited, with the staff user as actor.
            api_key_revoke(api_key=key, principal=None, actor=actor)
        self.message_user(request, f"Revoked {len(live)} key(s).", messages.SUCCESS)
