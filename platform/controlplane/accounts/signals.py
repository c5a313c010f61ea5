"""Any change that decides access invalidates the cached keys of its organization."""

from __future__ import annotations

from typing import Any

from django.db.models.signals import post_delete, post_save
from django.dispatch import receiver

from controlplane.tenancy.models import Membership, Organization

from .keycache import key_cache
from .models import APIKey, User


@receiver([post_save, post_delete], sender=APIKey)
@receiver([post_save, post_delete], sender=Membership)
def _owned_changed(sender: type, instance: APIKey | Membership, **kwargs: Any) -> None:
    key_cache.invalidate([instance.organization_id])


@receiver([post_save, post_delete], sender=Organization)
def _organization_changed(sender: type, instance: Organization, **kwargs: Any) -> None:
    key_cache.invalidate([instance.pk])


@receiver(post_save, sender=User)
def _user_changed(sender: type, instance: User, **kwargs: Any) -> None:
    if kwargs.get("update_fields") == frozenset({"last_login"}):
        return  # a login changes nothing about access
    key_cache.invalidate(
        Membership.objects.dangerously_unscoped()  # a user spans organizations
        .filter(user=instance)
        .values_list("organization_id", flat=True)
    )
