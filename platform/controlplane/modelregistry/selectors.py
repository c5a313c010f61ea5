"""Reads for the model registry.

What an organization can see: every active base model, and its own customer
models that are not deleted. Any other id, a foreign organization's model
included, is the same 404 (`model_not_found`), as in OpenAI's API.
"""

from __future__ import annotations

import re
from typing import Final

from django.db.models import Q, QuerySet

from controlplane.core.errors import NotFound
from controlplane.tenancy.models import Organization

from .models import BaseModel, CustomerModel

#: Anything a model id can hold; other strings are not looked up at all.
_PLAUSIBLE_ID: Final = re.compile(r"^[A-Za-z0-9._:-]{1,300}$")


def model_not_found(model_id: str, *, param: str | None = "model") -> NotFound:
    shown = model_id if len(model_id) <= 300 else model_id[:300] + "…"
    return NotFound(
        f"The model '{shown}' does not exist or you do not have access to it.",
        code="model_not_found",
        param=param,
    )


def base_models_active() -> QuerySet[BaseModel]:
    return BaseModel.objects.filter(is_active=True).order_by("id")


def customer_models_live(
    organization: Organization | str, *, engagement_id: str | None = None
) -> QuerySet[CustomerModel]:
    """The organization's models that are not deleted and not hidden: a custom engagement's
    model is the organization's once staff deliver it. With `engagement_id`, that
    engagement's undelivered models too (staff compressing what the engagement made)."""
    visible = Q(engagement_id__isnull=True) | Q(delivered_at__isnull=False)
    if engagement_id:
        visible |= Q(engagement_id=engagement_id)
    return (
        CustomerModel.objects.for_organization(organization)
        .filter(visible, deleted_at__isnull=True)
        .select_related("base")
    )


def models_visible(organization: Organization | str) -> list[BaseModel | CustomerModel]:
    """Active base models (by name), then the organization's own live models (newest first)."""
    base: list[BaseModel | CustomerModel] = list(base_models_active())
    return base + list(customer_models_live(organization).order_by("-created_at", "-pk"))


def base_model_get(model_id: str) -> BaseModel:
    """An active base model by name; `model_not_found` otherwise."""
    if not isinstance(model_id, str) or not _PLAUSIBLE_ID.match(model_id):
        raise model_not_found(str(model_id))
    model = base_models_active().filter(pk=model_id).first()
    if model is None:
        raise model_not_found(model_id)
    return model


def model_for_organization(
    *, organization: Organization | str, model_id: str, engagement_id: str | None = None
) -> BaseModel | CustomerModel:
    """A base model, or one of the organization's own customer models; `model_not_found`
    for anything else, whether it does not exist or belongs to another organization
    (or is an engagement's model not yet delivered, unless `engagement_id` names it)."""
    if not isinstance(model_id, str) or not _PLAUSIBLE_ID.match(model_id):
        raise model_not_found(str(model_id))
    if model_id.startswith("ft:"):
        customer = (
            customer_models_live(organization, engagement_id=engagement_id)
            .filter(pk=model_id)
            .first()
        )
        if customer is not None:
            return customer
        raise model_not_found(model_id)
    base = base_models_active().filter(pk=model_id).first()
    if base is None:
        raise model_not_found(model_id)
    return base
