"""Changes that decide limits or budgets clear this process's caches of them at once."""

from __future__ import annotations

from typing import Any

from django.db.models.signals import post_delete, post_save
from django.dispatch import receiver

from controlplane.billing.models import Plan
from controlplane.tenancy.models import Organization

from .models import Budget, KeyLimits


@receiver(post_save, sender=KeyLimits)
@receiver(post_delete, sender=KeyLimits)
@receiver(post_save, sender=Plan)
@receiver(post_delete, sender=Plan)
@receiver(post_save, sender=Organization)
def _limits_changed(**kwargs: Any) -> None:
    from .resolve import limits_cache_clear

    limits_cache_clear()


@receiver(post_save, sender=Budget)
@receiver(post_delete, sender=Budget)
def _budgets_changed(**kwargs: Any) -> None:
    from .budgets import budgets_cache_clear

    budgets_cache_clear()
