"""A change to what a key may call drops the gateway's cached model lookups everywhere.

The asyncio inference path caches `model_ref` answers per organization
(`gateway.model_refs`); they are dropped with the organization's cached keys, in
this process at once and in every other through the key cache's Redis channel.
"""

from __future__ import annotations

from typing import Any

from django.db.models.signals import post_delete, post_save
from django.dispatch import receiver

from controlplane.accounts.keycache import key_cache
from controlplane.modelregistry.models import BaseModel, CustomerModel

from .models import Deployment


@receiver([post_save, post_delete], sender=CustomerModel)
@receiver([post_save, post_delete], sender=Deployment)
def _owned_changed(sender: type, instance: CustomerModel | Deployment, **kwargs: Any) -> None:
    key_cache.invalidate([instance.organization_id])


@receiver([post_save, post_delete], sender=BaseModel)
def _base_changed(sender: type, instance: BaseModel, **kwargs: Any) -> None:
    key_cache.invalidate_all()
