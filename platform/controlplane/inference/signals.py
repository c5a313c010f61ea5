"""A change to what a key may call drops the gateway's cached model lookups everywhere.

The serving path caches `model_ref` answers per organization
(`serving.gateway.model_refs`); they are dropped with the organization's cached keys, in
this process at once and in every other through the key cache's Redis channel.

Deployments follow the apps below, which announce and never import inference: the model
of a succeeded fine-tuning job gets a serverless deployment; a deleted model, none.
"""

from __future__ import annotations

from typing import Any

from django.db.models.signals import post_delete, post_save
from django.dispatch import receiver

from controlplane.accounts.keycache import key_cache
from controlplane.jobs.models import Job
from controlplane.jobs.signals import job_succeeded
from controlplane.modelregistry.models import BaseModel, CustomerModel
from controlplane.modelregistry.signals import customer_model_deleted

from .deployments import deployment_ensure_serverless, deployments_delete_for_model
from .models import Deployment


@receiver([post_save, post_delete], sender=CustomerModel)
@receiver([post_save, post_delete], sender=Deployment)
def _owned_changed(sender: type, instance: CustomerModel | Deployment, **kwargs: Any) -> None:
    key_cache.invalidate([instance.organization_id])


@receiver([post_save, post_delete], sender=BaseModel)
def _base_changed(sender: type, instance: BaseModel, **kwargs: Any) -> None:
    key_cache.invalidate_all()


@receiver(job_succeeded, sender=Job)
def _fine_tuned(sender: type, job: Job, model: CustomerModel, **kwargs: Any) -> None:
    if model.hidden:
        return  # an engagement's model: deployed when staff deliver it, if they ask
    deployment_ensure_serverless(organization=job.organization_id, model_id=model.pk)


@receiver(customer_model_deleted, sender=CustomerModel)
def _model_deleted(sender: type, model: CustomerModel, **kwargs: Any) -> None:
    deployments_delete_for_model(organization=model.organization_id, model_id=model.pk)
