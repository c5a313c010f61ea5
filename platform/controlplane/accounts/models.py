"""Users (global identities) and API keys (owned by one organization).

Why not djangorestframework-api-key's `AbstractAPIKey`: importing it installs its
concrete `APIKey` model (a table and admin we would not use), its primary key is
`prefix.hash` (a hash must never be an id we expose or join on), and it parses
keys as `prefix.secret`. We keep the library's hashing and constant-time compare
(see keys.py) and model the rest here, scoped to an organization.
"""

from __future__ import annotations

from typing import Any, ClassVar

from django.contrib.auth.base_user import AbstractBaseUser, BaseUserManager
from django.contrib.auth.models import PermissionsMixin
from django.db import models
from django.db.models.functions import Lower
from django.utils import timezone

from controlplane.core.ids import new_key_id, new_user_id
from controlplane.core.scoping import OrganizationOwned, OrganizationScopedManager

from . import keys


class UserManager(BaseUserManager["User"]):
    use_in_migrations = True

    def create_user(self, email: str, password: str | None = None, **extra: Any) -> User:
        if not email:
            raise ValueError("Users need an email address.")
        user = self.model(email=self.normalize_email(email).lower(), **extra)
        user.set_password(password)
        user.save(using=self._db)
        return user

    def create_superuser(self, email: str, password: str | None = None, **extra: Any) -> User:
        extra.setdefault("is_staff", True)
        extra.setdefault("is_superuser", True)
        return self.create_user(email, password, **extra)


class User(AbstractBaseUser, PermissionsMixin):
    id = models.CharField(primary_key=True, max_length=40, default=new_user_id, editable=False)
    email = models.EmailField(unique=True)
    name = models.CharField(max_length=200, blank=True)
    is_active = models.BooleanField(default=True)
    is_staff = models.BooleanField(default=False)
    date_joined = models.DateTimeField(default=timezone.now)

    objects = UserManager()

    USERNAME_FIELD = "email"
    EMAIL_FIELD = "email"
    REQUIRED_FIELDS: ClassVar[list[str]] = []

    class Meta:
        constraints = [models.UniqueConstraint(Lower("email"), name="user_email_ci_unique")]

    def __str__(self) -> str:
        return self.email


class APIKey(OrganizationOwned):
    id = models.CharField(primary_key=True, max_length=40, default=new_key_id, editable=False)
    name = models.CharField(max_length=100)
    prefix = models.CharField(max_length=keys.PREFIX_LENGTH, unique=True, editable=False)
    hashed_key = models.CharField(max_length=200, editable=False)
    last_four = models.CharField(max_length=4, editable=False)
    scopes = models.JSONField(default=list)
    member = models.ForeignKey(
        "tenancy.Membership",
        null=True,
        blank=True,
        on_delete=models.CASCADE,  # a removed member's keys go with them
        related_name="api_keys",
        help_text="The member this key acts for; empty for a service key.",
    )
    created_by = models.ForeignKey(
        User, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    expires_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)
    last_used_at = models.DateTimeField(null=True, blank=True)
    rotated_at = models.DateTimeField(null=True, blank=True)
    rotated_to = models.ForeignKey(
        "self", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )

    objects = OrganizationScopedManager["APIKey"]()

    class Meta(OrganizationOwned.Meta):
        verbose_name = "API key"
        indexes = [models.Index(fields=["organization", "-id"], name="apikey_org_id")]

    def __str__(self) -> str:
        return f"{self.name} ({self.redacted_value})"

    @property
    def redacted_value(self) -> str:
        return f"{keys.KEY_START}{self.prefix}_…{self.last_four}"

    @property
    def status(self) -> str:
        now = timezone.now()
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and self.expires_at <= now:
            return "rotated" if self.rotated_at is not None else "expired"
        if self.rotated_at is not None:
            return "rotating"
        return "active"
