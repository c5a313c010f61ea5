"""The lineage half of a model card: the job that made a customer model, its method and
hyperparameters, the exact data it read, its metrics and a compression report.

Registered with the model registry (`modelregistry.cards.card_lineage_set`) in
`JobsConfig.ready()`: the registry sits below jobs and never imports it. Everything is
read through the model's own organization; a data partner's version the organization
licensed shows the listing's public title and terms only (never the partner's files,
recipe, report or rows).
"""

from __future__ import annotations

from typing import Any, Final

from django.db.models import F

from controlplane.datasets.models import AccessGrant, AccessStatus, DatasetVersion, File
from controlplane.modelregistry.models import CustomerModel, ModelKind
from controlplane.tenancy.models import Membership

from .models import Job, JobCheckpoint, JobEvent, JobKind

#: A compressed model's source may itself be compressed (a pruned model quantized): the
#: card follows the chain this far.
MAX_SOURCE_DEPTH: Final = 3
#: Who made an engagement's model (staff, whose identity is not the customer's to see).
ENGAGEMENT_AUTHOR: Final = "Atelier (custom engagement)"


def _method(job: Job, model: CustomerModel) -> str:
    if job.kind == JobKind.COMPRESSION:
        return str((model.compression or {}).get("method") or job.method)
    if job.method == "dpo":
        return "dpo"
    return "full" if job.adapter is None else "lora"


def _adapter(job: Job) -> str | None:
    if job.kind == JobKind.COMPRESSION:
        return None
    return str(job.adapter.get("type") or "lora") if job.adapter else "full"


def _created_by(job: Job) -> dict[str, Any] | None:
    """A display name, only for a member of the model's own organization."""
    if job.engagement_id:
        return {"name": ENGAGEMENT_AUTHOR}
    user = job.created_by
    if user is None:
        return None
    member = Membership.objects.for_organization(job.organization_id).filter(user=user).exists()
    if not member:
        return {"name": "A former member"}
    return {"name": user.name or user.email.split("@", 1)[0]}


def _file(file: File, role: str) -> dict[str, Any]:
    validation = file.validation or {}
    return {
        "role": role,
        "id": file.pk,
        "filename": file.filename,
        "bytes": file.bytes,
        "sha256": file.sha256,
        "format": validation.get("format"),
        "rows": validation.get("rows"),
    }


def _own_version(version: DatasetVersion) -> dict[str, Any]:
    report = version.report or {}
    return {
        "id": version.pk,
        "dataset_id": version.dataset_id,
        "number": version.number,
        "source_files": list(version.source_files),
        "recipe": version.recipe,
        "format": version.format,
        "sha256": version.sha256,
        "rows": version.rows,
        # How many rows each cleaning step removed (datasets.preprocess.PreprocessReport).
        "preprocessing": {
            "rows_in": report.get("rows_in"),
            "rows_out": report.get("rows_out"),
            "removed": report.get("removed"),
            "pii_found": report.get("pii_found"),
        }
        if report
        else None,
    }


def _training_data(job: Job) -> dict[str, Any]:
    files = []
    for role, file in (
        ("training", job.training_file),
        ("validation", job.validation_file),
        ("test", getattr(job, "test_file", None)),
    ):
        if isinstance(file, File) and file.organization_id == job.organization_id:
            files.append(_file(file, role))
    versions: list[dict[str, Any]] = []
    licensed: list[dict[str, Any]] = []
    version = job.dataset_version
    if version is not None:
        if version.organization_id == job.organization_id:
            versions.append(_own_version(version))
        else:
            grants = (
                AccessGrant.objects.for_organization(job.organization_id)
                .filter(listing__version=version)
                .exclude(status=AccessStatus.DECLINED)
                .select_related("listing")
                .order_by("created_at")
            )
            licensed = [
                {
                    "dataset_version": version.pk,
                    "listing_id": grant.listing_id,
                    "title": grant.listing.title,
                    "terms": grant.listing.license_terms,
                }
                for grant in grants
            ]
    return {"files": files, "dataset_versions": versions, "licensed_datasets": licensed}


def _only(metrics: dict[str, Any], prefix: str) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if k.startswith(prefix)}


#: A metrics event holding one of these is an evaluation (not a training step's progress).
_VALID_KEYS: Final = ["valid_loss", "valid_accuracy", "valid_reward_accuracy", "valid_cosine"]
_TEST_KEYS: Final = ["test_loss", "test_accuracy", "test_reward_accuracy", "test_cosine"]


def _last_event(job: Job, keys: list[str], step: int | None) -> dict[str, Any]:
    events = JobEvent.objects.for_organization(job.organization_id).filter(
        job=job, type="metrics", data__has_any_keys=keys
    )
    if step is not None:
        events = events.filter(data__step__lte=step)
    event = events.order_by(
        F("attempt").desc(nulls_last=True), F("seq").desc(nulls_last=True), "-id"
    ).first()
    return (event.data if event else None) or {}


def _test_metrics(job: Job, model: CustomerModel) -> dict[str, Any] | None:
    """The held-out test metrics of a final model: the job's own field where it has one,
    else the test evaluation the worker reported."""
    if model.kind == ModelKind.CHECKPOINT:  # only the final model is tested
        return None
    stored = getattr(job, "test_metrics", None)
    if isinstance(stored, dict) and stored:
        return stored
    return _only(_last_event(job, _TEST_KEYS, None), "test_") or None


def _validation_metrics(job: Job, model: CustomerModel) -> dict[str, Any] | None:
    """The final model's validation metrics, where the job stored them; else the last
    evaluation the job reported (at the checkpoint's step, for a checkpoint)."""
    stored = getattr(job, "validation_metrics", None)
    final = model.kind != ModelKind.CHECKPOINT
    if final and isinstance(stored, dict) and _only(stored, "valid_"):
        return {"step": job.total_steps, **_only(stored, "valid_")}
    if not final and model.step is not None:
        checkpoint = (
            JobCheckpoint.objects.for_organization(job.organization_id)
            .filter(job=job, step_number=model.step)
            .first()
        )
        found = _only((checkpoint.metrics if checkpoint else None) or {}, "valid_")
        if found:
            return {"step": model.step, **found}
    data = _last_event(job, _VALID_KEYS, None if final else model.step)
    found = _only(data, "valid_")
    if not found:
        return None
    return {"step": data.get("step"), **found}


def _hyperparameters(job: Job) -> dict[str, Any]:
    out = dict(job.hyperparameters or {})
    if job.adapter:
        out["adapter"] = job.adapter
    return out


def lineage(model: CustomerModel, depth: int = 0) -> dict[str, Any]:
    """The card's lineage sections for one of an organization's models."""
    job = (
        Job.objects.for_organization(model.organization_id)
        .filter(pk=model.job_id)
        .select_related(
            "training_file",
            "validation_file",
            "test_file",
            "dataset_version",
            "created_by",
            "source_model",
        )
        .first()
    )
    if job is None:
        return {}
    source: dict[str, Any] | None = None
    if job.kind == JobKind.COMPRESSION:
        source = {"id": job.source_model_id or job.base_model_id}
        parent = job.source_model
        if (
            parent is not None
            and parent.organization_id == model.organization_id
            and depth < MAX_SOURCE_DEPTH
        ):
            source.update(lineage(parent, depth + 1))
    return {
        "method": _method(job, model),
        "adapter": _adapter(job),
        "hyperparameters": _hyperparameters(job),
        "job": {
            "id": job.pk,
            "kind": job.kind,
            "status": job.status,
            "seed": job.seed,
            "trained_tokens": job.trained_tokens,
            "finished_at": int(job.finished_at.timestamp()) if job.finished_at else None,
        },
        "training_data": _training_data(job),
        "metrics": {
            "validation": _validation_metrics(job, model),
            "test": _test_metrics(job, model),
        },
        "compression": job.report if job.kind == JobKind.COMPRESSION else None,
        "source_model": source,
        "created_by": _created_by(job),
    }
