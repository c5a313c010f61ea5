"""Models (`/v1/models`), in OpenAI's shapes with our fields added."""

from __future__ import annotations

from typing import Any

from drf_spectacular.utils import extend_schema
from rest_framework.request import Request
from rest_framework.response import Response

from controlplane.core.errors import ApiError
from controlplane.core.serializers import unix
from controlplane.tenancy.apis_base import OrganizationApi
from controlplane.tenancy.roles import Role

from . import selectors, services
from .models import BaseModel, CustomerModel


def model_out(model: BaseModel | CustomerModel) -> dict[str, Any]:
    """OpenAI's model object (`id, object, created, owned_by`) and what we know besides."""
    common = {"id": model.pk, "object": "model", "created": unix(model.created_at)}
    if isinstance(model, BaseModel):
        return {
            **common,
            "owned_by": model.owned_by,
            "kind": "base",
            "family": model.family,
            "context_length": model.context_length,
            "tasks": list(model.tasks),
            "methods": list(model.methods),
            "adapters": list(model.adapters),
            "price_per_1k_training_tokens": str(model.price_per_1k_training_tokens),
            "description": model.description,
            "base_model": None,
            "job_id": None,
            "suffix": None,
            "step": None,
            "version": None,
            "artifact_kind": None,
            "labels": None,
        }
    base = model.base
    return {
        **common,
        "owned_by": model.owned_by,
        "kind": model.kind,
        "family": base.family,
        "context_length": base.context_length,
        "tasks": [model.task],
        "methods": [],
        "adapters": [],
        "price_per_1k_training_tokens": None,
        "description": "",
        "base_model": base.pk,
        "job_id": model.job_id,
        "suffix": model.suffix or None,
        "step": model.step,
        "version": model.version,
        "artifact_kind": model.artifact_kind,
        "labels": list(model.labels),
    }


class ModelsApi(OrganizationApi):
    scopes = {"read": "models.read", "write": "models.write"}


class ModelListApi(ModelsApi):
    """Base models every organization may fine-tune, and the caller's own fine-tuned models."""

    @extend_schema(responses={200: dict}, operation_id="list_models")
    def get(self, request: Request) -> Response:
        data = [model_out(m) for m in selectors.models_visible(self.organization)]
        return Response({"object": "list", "data": data})


class ModelDetailApi(ModelsApi):
    def _model(self, model_id: str) -> BaseModel | CustomerModel:
        return selectors.model_for_organization(organization=self.organization, model_id=model_id)

    @extend_schema(responses={200: dict})
    def get(self, request: Request, model_id: str) -> Response:
        return Response(model_out(self._model(model_id)))

    @extend_schema(responses={200: dict})
    def delete(self, request: Request, model_id: str) -> Response:
        model = self._model(model_id)
        if isinstance(model, BaseModel):
            raise ApiError(
                f"'{model.pk}' is a base model provided by Atelier and cannot be deleted; "
                "only your own fine-tuned models can be.",
                status_code=403,
                code="cannot_delete_base_model",
            )
        # As in OpenAI: deleting a model takes the owner role. Service keys (no member)
        # are refused too: an admin could otherwise delete through one they made.
        if self.principal.role != Role.OWNER:
            raise ApiError(
                "Only organization owners can delete models: use a key of an owner.",
                status_code=403,
                code="insufficient_role",
            )
        services.customer_model_delete(organization=self.organization, model=model)
        return Response({"id": model.pk, "object": "model", "deleted": True})
