"""Writes for the model registry: customer models registered and deleted, base models imported."""

from __future__ import annotations

import re
from collections.abc import Sequence
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Final

import structlog
from django.db import transaction
from django.db.models import Q
from django.utils import timezone
from django.utils.text import slugify

from controlplane.datasets.storage import object_uri
from controlplane.tenancy.models import Organization

from . import artifacts
from .models import (
    ADAPTERS,
    BASE_NAME_RE,
    METHODS,
    TASKS,
    ArtifactKind,
    BaseModel,
    CustomerModel,
    ModelKind,
)
from .signals import customer_model_deleted

log = structlog.get_logger(__name__)

#: Encoder-only families: they embed and classify, they do not generate.
ENCODER_FAMILIES: Final = frozenset(
    {"bert", "roberta", "xlm-roberta", "distilbert", "albert", "electra", "deberta", "mpnet"}
)
_SUFFIX_RE: Final = re.compile(r"^[A-Za-z0-9_-]{0,64}$")
_JOB_ID_RE: Final = re.compile(r"^[A-Za-z0-9_-]{1,40}$")
_SLUG_MAX: Final = 40


# --- customer models ----------------------------------------------------------------------


def organization_slug(organization: Organization) -> str:
    """The organization part of a model id: its name, slugified (its id if that is empty)."""
    slug = slugify(organization.name)[:_SLUG_MAX].strip("-_")
    return slug or organization.pk.replace("_", "-")


def customer_model_id(
    *,
    base_id: str,
    organization_slug: str,
    suffix: str,
    job_id: str,
    step: int | None = None,
    compressed: bool = False,
) -> str:
    """`ft:{base}:{org}:{suffix}:{job}`, plus `:ckpt-step-{n}` for a checkpoint (as OpenAI);
    `ft:{base}:{org}:{suffix}:compressed:{job}` for a compressed model."""
    if compressed:
        return f"ft:{base_id}:{organization_slug}:{suffix}:compressed:{job_id}"
    model_id = f"ft:{base_id}:{organization_slug}:{suffix}:{job_id}"
    return model_id if step is None else f"{model_id}:ckpt-step-{step}"


@transaction.atomic
def customer_model_register(
    *,
    organization: Organization,
    base: BaseModel,
    job_id: str,
    suffix: str,
    kind: str,
    step: int | None,
    uri: str,
    artifact_kind: str,
    task: str,
    labels: Sequence[str],
    compression: dict[str, Any] | None = None,
    engagement_id: str | None = None,
) -> CustomerModel:
    """Record a fine-tuned model (kind "final"), one of its checkpoints (kind "checkpoint"),
    or a compressed model (kind "compressed", with `compression` saying how it was made).

    Idempotent on the model id: registering the same job's final model (or the
    same checkpoint step) again returns the row made the first time, unchanged.
    `version` is 1 + the number of final models this organization already has
    for the same base model and suffix (from other jobs, deleted ones included,
    so numbers are never reused); a checkpoint carries the version its job's
    final model gets. A model of an engagement's job (`engagement_id`) stays hidden
    from the organization until it is delivered.
    """
    suffix = suffix or ""
    if not _SUFFIX_RE.match(suffix):
        raise ValueError("suffix: use up to 64 letters, digits, '-' or '_'")
    if not _JOB_ID_RE.match(job_id):
        raise ValueError("job_id: use 1 to 40 letters, digits, '-' or '_'")
    if kind not in ModelKind.values:
        raise ValueError(f"kind must be one of {', '.join(ModelKind.values)}")
    if kind == ModelKind.CHECKPOINT and (type(step) is not int or step < 0):
        raise ValueError("a checkpoint needs its step (a non-negative integer)")
    if step is not None and (type(step) is not int or step < 0):
        raise ValueError("step must be a non-negative integer or None")
    if artifact_kind not in ArtifactKind.values:
        raise ValueError(f"artifact_kind must be one of {', '.join(ArtifactKind.values)}")
    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}")
    if not uri or not isinstance(uri, str):
        raise ValueError("uri is required")
    if isinstance(labels, str) or not all(isinstance(label, str) for label in labels):
        raise ValueError("labels must be a list of strings")

    model_id = customer_model_id(
        base_id=base.pk,
        organization_slug=organization_slug(organization),
        suffix=suffix,
        job_id=job_id,
        step=step if kind == ModelKind.CHECKPOINT else None,
        compressed=kind == ModelKind.COMPRESSED,
    )
    models = CustomerModel.objects.for_organization(organization)
    existing = models.filter(pk=model_id).first()
    if existing is not None:
        return existing
    # One registration at a time per organization: versions are counted, then used.
    Organization.objects.select_for_update().filter(pk=organization.pk).first()
    existing = models.filter(pk=model_id).first()
    if existing is not None:
        return existing
    counted = ModelKind.COMPRESSED if kind == ModelKind.COMPRESSED else ModelKind.FINAL
    earlier = models.filter(base=base, suffix=suffix, kind=counted).exclude(job_id=job_id).count()
    model = CustomerModel.objects.create(
        id=model_id,
        organization=organization,
        base=base,
        job_id=job_id,
        suffix=suffix,
        kind=kind,
        step=step,
        uri=uri,
        artifact_kind=artifact_kind,
        task=task,
        labels=list(labels),
        version=earlier + 1,
        compression=compression,
        engagement_id=engagement_id or None,
    )
    log.info("modelregistry.model_registered", model_id=model_id, job_id=job_id, kind=kind)
    return model


@transaction.atomic
def customer_model_delete(*, organization: Organization, model: CustomerModel) -> CustomerModel:
    """Soft-delete a customer model; its stored objects go after commit, best effort.

    The row stays (jobs and usage refer to it) but the model disappears from
    listings and every lookup. Objects are kept when another live model of the
    organization points into the same directory.
    """
    models = CustomerModel.objects.for_organization(organization)
    model = models.select_for_update().get(pk=model.pk)
    if model.deleted_at is not None:
        return model
    model.deleted_at = timezone.now()
    model.save(update_fields=["deleted_at"])
    # A deleted model is never served again: inference frees any capacity deployed for it.
    customer_model_deleted.send(sender=CustomerModel, model=model)
    uri = model.uri.rstrip("/")
    shared = (
        models.filter(deleted_at__isnull=True)
        .exclude(pk=model.pk)
        .filter(Q(uri=uri) | Q(uri=uri + "/") | Q(uri__startswith=uri + "/"))
        .exists()
    )
    if shared:
        log.info("modelregistry.artifacts_kept", model_id=model.pk, reason="shared")
    else:
        transaction.on_commit(lambda: artifacts.delete_prefix(uri))
    log.info("modelregistry.model_deleted", model_id=model.pk)
    return model


# --- base models --------------------------------------------------------------------------


def default_capabilities(family: str) -> tuple[list[str], list[str], list[str]]:
    """(tasks, methods, adapters) a family supports unless told otherwise."""
    if family in ENCODER_FAMILIES:
        return ["embeddings", "classification"], ["supervised"], ["lora", "full"]
    return ["causal_lm", "classification"], ["supervised", "dpo"], ["lora", "full"]


def _subset(name: str, values: Sequence[str], allowed: Sequence[str]) -> list[str]:
    values = list(dict.fromkeys(values))
    unknown = [v for v in values if v not in allowed]
    if unknown or not values:
        raise ValueError(f"{name} must be one or more of {', '.join(allowed)}; got {values}")
    return values


def _price(value: Decimal | str | int) -> Decimal:
    try:
        price = Decimal(str(value))
    except InvalidOperation:
        raise ValueError(f"price_per_1k_training_tokens must be a number; got {value!r}") from None
    if not price.is_finite() or price < 0 or price >= 10**6:
        raise ValueError("price_per_1k_training_tokens must be between 0 and 999999.999999")
    if price != price.quantize(Decimal("0.000001")):
        raise ValueError("price_per_1k_training_tokens has at most 6 decimal places")
    return price


def base_model_import(
    *,
    path: Path,
    name: str,
    family: str | None = None,
    price_per_1k_training_tokens: Decimal | str | int,
    context_length: int | None = None,
    description: str = "",
    copy: bool = True,
    tasks: Sequence[str] | None = None,
    methods: Sequence[str] | None = None,
    adapters: Sequence[str] | None = None,
) -> BaseModel:
    """Add a base model from a local Hugging Face-format directory (safetensors only).

    `family` and `context_length` default to config.json's `model_type` and
    `max_position_embeddings` (or `n_positions`, `n_ctx`); tasks, methods and
    adapters to what the family supports. With `copy` the files are streamed
    into object storage under `base-models/<name>/` and `uri` points there;
    without it `uri` is the directory itself (`file://…`), which every worker
    must then be able to read. Raises ValueError, saying what to change, for a
    bad name, a name in use, or a directory that is not a safetensors model.
    """
    if not BASE_NAME_RE.match(name):
        raise ValueError(
            f"Invalid model name {name!r}: use up to 64 letters, digits, '.', '-' or '_', "
            "starting with a letter or digit."
        )
    if BaseModel.objects.filter(pk=name).exists():
        raise ValueError(f"A base model named {name!r} already exists.")
    model_dir = artifacts.inspect_model_dir(Path(path))
    family = family or model_dir.family
    if not family:
        raise ValueError("config.json has no model_type: give the family explicitly.")
    context_length = context_length or model_dir.context_length
    if not context_length or context_length < 1:
        raise ValueError(
            "config.json has no max_position_embeddings or n_positions: "
            "give the context length explicitly."
        )
    default_tasks, default_methods, default_adapters = default_capabilities(family)
    tasks = _subset("tasks", tasks or default_tasks, TASKS)
    methods = _subset("methods", methods or default_methods, METHODS)
    adapters = _subset("adapters", adapters or default_adapters, ADAPTERS)
    price = _price(price_per_1k_training_tokens)

    prefix = f"base-models/{name}"
    if copy:
        artifacts.copy_to_storage(model_dir, prefix)
        uri = object_uri(prefix)
    else:
        uri = Path(path).resolve().as_uri()
    try:
        with transaction.atomic():
            model = BaseModel.objects.create(
                id=name,
                family=family,
                tasks=tasks,
                methods=methods,
                adapters=adapters,
                context_length=context_length,
                uri=uri,
                price_per_1k_training_tokens=price,
                description=description,
            )
    except BaseException:
        # Unless a concurrent import of the same name won: the objects are its now.
        if copy and not BaseModel.objects.filter(pk=name).exists():
            artifacts.delete_prefix(uri)
        raise
    log.info("modelregistry.base_model_imported", model_id=name, uri=uri, copied=copy)
    return model
