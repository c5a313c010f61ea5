"""Deployments: which models an organization can call, and with what capacity.

Base models are always callable (the shared serverless pool serves them); a
customer model is callable while it has an active deployment. A fine-tuning job
that succeeds gets one automatically (`deployment_ensure_serverless`), as with
OpenAI, where a fine-tuned model answers as soon as its job is done; checkpoint
models need an explicit `POST /v1/deployments`.
"""

from __future__ import annotations

from dataclasses import dataclass

import structlog
from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import QuerySet
from django.utils import timezone

from controlplane.core.errors import ApiError, Conflict
from controlplane.modelregistry.models import BaseModel, CustomerModel
from controlplane.modelregistry.selectors import model_for_organization
from controlplane.tenancy.models import Organization
from jobcontracts.inference import MODEL_TASKS

from .models import Deployment, DeploymentStatus, DeploymentType

log = structlog.get_logger(__name__)


# --- selectors -------------------------------------------------------------------------------


def deployments_active(organization: Organization | str) -> QuerySet[Deployment]:
    return Deployment.objects.for_organization(organization).filter(status=DeploymentStatus.ACTIVE)


def deployment_for_model(*, organization: Organization | str, model_id: str) -> Deployment | None:
    """The organization's active deployment of this model, if any."""
    return deployments_active(organization).filter(model_id=model_id).first()


def model_is_deployed(
    *, organization: Organization | str, model: BaseModel | CustomerModel
) -> bool:
    """Whether the organization may call this model now (the model is one it can see).

    Base models are always callable: the shared pool serves them without a
    deployment. A customer model needs an active deployment.
    """
    if isinstance(model, BaseModel):
        return True
    return deployment_for_model(organization=organization, model_id=model.pk) is not None


# --- services --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Replicas:
    min: int
    max: int


def _invalid(message: str, param: str) -> ApiError:
    return ApiError(message, status_code=400, code="invalid_value", param=param)


def _replicas(type_: str, min_replicas: int | None, max_replicas: int | None) -> Replicas:
    """The replica range a deployment of this type gets; 400 naming the field otherwise."""
    cap = int(settings.INFERENCE_MAX_REPLICAS)
    if type_ == DeploymentType.SERVERLESS:
        low = 0 if min_replicas is None else min_replicas
        if low != 0:
            raise _invalid(
                "Serverless deployments scale to zero: 'min_replicas' must be 0. "
                "To keep replicas loaded, use type 'dedicated'.",
                "min_replicas",
            )
    elif type_ == DeploymentType.DEDICATED:
        low = 1 if min_replicas is None else min_replicas
        if not 1 <= low <= cap:
            raise _invalid(
                f"Dedicated deployments need 'min_replicas' between 1 and {cap}.", "min_replicas"
            )
    else:
        raise _invalid("'type' must be 'serverless' or 'dedicated'.", "type")
    high = max(low, 1) if max_replicas is None else max_replicas
    if not 1 <= high <= cap:
        raise _invalid(f"'max_replicas' must be between 1 and {cap}.", "max_replicas")
    if high < low:
        raise _invalid(
            f"'max_replicas' ({high}) must be at least 'min_replicas' ({low}).", "max_replicas"
        )
    return Replicas(low, high)


def _servable(model: BaseModel | CustomerModel) -> bool:
    tasks = list(model.tasks) if isinstance(model, BaseModel) else [model.task]
    return any(task in MODEL_TASKS for task in tasks)


def _exists(model_id: str, existing: Deployment) -> Conflict:
    return Conflict(
        f"The model '{model_id}' already has an active deployment, '{existing.pk}'. "
        f"Change its replicas with PATCH /v1/deployments/{existing.pk}, or delete it first.",
        code="deployment_exists",
        param="model",
    )


@transaction.atomic
def deployment_create(
    *,
    organization: Organization,
    user_id: str | None,
    model_id: str,
    type: str,
    min_replicas: int | None = None,
    max_replicas: int | None = None,
) -> Deployment:
    """Deploy a model the organization can see (404 `model_not_found` otherwise).

    At most one active deployment per model: a second is a 409 naming the first.
    """
    model = model_for_organization(organization=organization, model_id=model_id)
    if not _servable(model):
        raise ApiError(
            f"The model '{model_id}' has no task inference can serve ({', '.join(MODEL_TASKS)}).",
            code="model_not_supported",
            param="model",
        )
    replicas = _replicas(type, min_replicas, max_replicas)
    existing = deployment_for_model(organization=organization, model_id=model.pk)
    if existing is not None:
        raise _exists(model.pk, existing)
    try:
        with transaction.atomic():
            deployment = Deployment.objects.create(
                organization=organization,
                model_id=model.pk,
                type=type,
                min_replicas=replicas.min,
                max_replicas=replicas.max,
                created_by_id=user_id,
            )
    except IntegrityError:
        # A concurrent request deployed it between our check and our insert.
        existing = deployment_for_model(organization=organization, model_id=model.pk)
        if existing is None:
            raise
        raise _exists(model.pk, existing) from None
    log.info(
        "inference.deployment_created",
        organization_id=organization.pk,
        deployment_id=deployment.pk,
        model=model.pk,
        type=type,
    )
    return deployment


@transaction.atomic
def deployment_update(
    *, deployment: Deployment, min_replicas: int | None = None, max_replicas: int | None = None
) -> Deployment:
    """Change the replica range; what is not given keeps its value."""
    deployment = Deployment.objects.locked(deployment)
    if not deployment.is_active:
        raise ApiError(
            f"The deployment '{deployment.pk}' was deleted.",
            status_code=404,
            code="not_found",
            param="id",
        )
    replicas = _replicas(
        deployment.type,
        deployment.min_replicas if min_replicas is None else min_replicas,
        deployment.max_replicas if max_replicas is None else max_replicas,
    )
    deployment.min_replicas, deployment.max_replicas = replicas.min, replicas.max
    deployment.save(update_fields=["min_replicas", "max_replicas", "updated_at"])
    log.info(
        "inference.deployment_updated",
        organization_id=deployment.organization_id,
        deployment_id=deployment.pk,
        min_replicas=replicas.min,
        max_replicas=replicas.max,
    )
    return deployment


@transaction.atomic
def deployment_delete(*, deployment: Deployment) -> Deployment:
    """Soft delete: the model stops being callable (a customer model's; base models stay)."""
    deployment = Deployment.objects.locked(deployment)
    if deployment.is_active:
        deployment.status = DeploymentStatus.DELETED
        deployment.deleted_at = timezone.now()
        deployment.save(update_fields=["status", "deleted_at", "updated_at"])
        log.info(
            "inference.deployment_deleted",
            organization_id=deployment.organization_id,
            deployment_id=deployment.pk,
            model=deployment.model_id,
        )
    return deployment


def deployments_delete_for_model(*, organization: Organization | str, model_id: str) -> int:
    """Delete the model's active deployment, if any (when the model itself is deleted, so a
    dedicated deployment stops holding capacity for a model nobody can call)."""
    deleted = 0
    for deployment in deployments_active(organization).filter(model_id=model_id):
        deployment_delete(deployment=deployment)
        deleted += 1
    return deleted


def deployment_ensure_serverless(*, organization: Organization | str, model_id: str) -> Deployment:
    """The model's active deployment, or a new serverless one (idempotent).

    Called when a fine-tuning job succeeds, inside the transaction that records
    its model: a report applied twice, or racing another, still leaves one.
    """
    org_id = organization.pk if isinstance(organization, Organization) else organization
    existing = deployment_for_model(organization=org_id, model_id=model_id)
    if existing is not None:
        return existing
    try:
        with transaction.atomic():
            deployment = Deployment.objects.create(
                organization_id=org_id,
                model_id=model_id,
                type=DeploymentType.SERVERLESS,
                min_replicas=0,
                max_replicas=1,
            )
    except IntegrityError:
        existing = deployment_for_model(organization=org_id, model_id=model_id)
        if existing is None:
            raise
        return existing
    log.info(
        "inference.deployment_auto_created",
        organization_id=org_id,
        deployment_id=deployment.pk,
        model=model_id,
    )
    return deployment
