"""Model cards (`/v1/models/{id}/card`): what a model is, what it was made from, how well it
does, and what its owners say it is for.

A base model's card comes from the catalogue row alone. A customer model's card also holds
its lineage (the job, its data, its metrics, a compression report), which the jobs app
knows and this app, below it, does not: jobs registers the function that reads it
(`card_lineage_set`, in `JobsConfig.ready()`), as payments registers billing's collector.

A card is built for the organization that owns the model, from that organization's rows
(and, for a data partner's licensed version, the listing's public title and terms only):
it never holds another tenant's data.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Final

from django.db import transaction

from controlplane.audit.services import Actor, audit_record
from controlplane.core.serializers import unix

from .models import BaseModel, CustomerModel

#: The most characters `intended_use` and `limitations` may each hold.
CARD_TEXT_MAX: Final = 4000
#: The free-text fields owners and admins may set.
CARD_TEXT_FIELDS: Final = ("intended_use", "limitations")

#: Reads a customer model's lineage (job, method, data, metrics, compression, creator).
Lineage = Callable[[CustomerModel], dict[str, Any]]

_lineage: Lineage | None = None


def card_lineage_set(lineage: Lineage) -> None:
    """Register the one lineage reader (the jobs app's)."""
    global _lineage
    _lineage = lineage


def _base_section(base: BaseModel) -> dict[str, Any]:
    return {
        "id": base.pk,
        "family": base.family,
        "context_length": base.context_length,
        "tasks": list(base.tasks),
        "description": base.description,
    }


def _empty_lineage() -> dict[str, Any]:
    return {
        "method": None,
        "adapter": None,
        "hyperparameters": None,
        "job": None,
        "training_data": {"files": [], "dataset_versions": [], "licensed_datasets": []},
        "metrics": {"validation": None, "test": None},
        "compression": None,
        "source_model": None,
        "created_by": None,
    }


def base_card(base: BaseModel) -> dict[str, Any]:
    """The card of a platform base model: what the catalogue says of it."""
    return {
        "object": "model.card",
        "id": base.pk,
        "kind": "base",
        "owned_by": base.owned_by,
        "created_at": unix(base.created_at),
        "base_model": _base_section(base),
        "task": None,
        "supported": {
            "tasks": list(base.tasks),
            "methods": list(base.methods),
            "adapters": list(base.adapters),
        },
        "price_per_1k_training_tokens": str(base.price_per_1k_training_tokens),
        **_empty_lineage(),
        "created_by": {"name": "Atelier"},
        "intended_use": base.description,
        "limitations": "",
    }


def customer_card(model: CustomerModel) -> dict[str, Any]:
    """The card of one of an organization's own models, lineage included."""
    lineage = _lineage(model) if _lineage is not None else _empty_lineage()
    return {
        "object": "model.card",
        "id": model.pk,
        "kind": model.kind,
        "owned_by": model.owned_by,
        "created_at": unix(model.created_at),
        "base_model": _base_section(model.base),
        "task": model.task,
        "labels": list(model.labels) or None,
        "step": model.step,
        "version": model.version,
        **_empty_lineage(),
        **lineage,
        "intended_use": model.intended_use,
        "limitations": model.limitations,
    }


def card_for(model: BaseModel | CustomerModel) -> dict[str, Any]:
    return base_card(model) if isinstance(model, BaseModel) else customer_card(model)


@transaction.atomic
def customer_model_card_update(
    *, model: CustomerModel, changes: dict[str, str], actor: Actor
) -> CustomerModel:
    """Set a model's card text (`intended_use`, `limitations`), recorded in the audit log."""
    changed = {
        name: value
        for name, value in changes.items()
        if name in CARD_TEXT_FIELDS and getattr(model, name) != value
    }
    if not changed:
        return model
    for name, value in changed.items():
        setattr(model, name, value)
    model.save(update_fields=list(changed))
    audit_record(
        organization=model.organization_id,
        actor=actor,
        action="model.card_updated",
        # Model ids are longer than the log's target id column: the id goes in details,
        # as the admin's model deletions record it.
        target_type="model",
        details={"model_id": model.pk, "fields": sorted(changed)},
    )
    return model


# --- Markdown ----------------------------------------------------------------------------


def _cell(value: Any) -> str:
    if isinstance(value, dict | list):
        value = json.dumps(value, sort_keys=True)
    text = "—" if value is None or value == "" else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def _table(rows: list[tuple[Any, Any]]) -> list[str]:
    if not rows:
        return ["None."]
    return ["| | |", "|---|---|", *(f"| {_cell(k)} | {_cell(v)} |" for k, v in rows)]


def _metrics_lines(title: str, metrics: dict[str, Any] | None) -> list[str]:
    return [f"**{title}**", "", *_table(sorted((metrics or {}).items())), ""]


def _when(seconds: Any) -> str | None:
    if not isinstance(seconds, int):
        return None
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%d %H:%M UTC")


def card_markdown(card: dict[str, Any]) -> str:
    """The card as a Markdown document (`Accept: text/markdown`)."""
    base = card.get("base_model") or {}
    out = [f"# Model card: {card['id']}", ""]
    out += _table(
        [
            ("Kind", card.get("kind")),
            ("Base model", base.get("id")),
            ("Task", card.get("task")),
            ("Method", card.get("method")),
            ("Adapter", card.get("adapter")),
            ("Created by", (card.get("created_by") or {}).get("name")),
            ("Created at", _when(card.get("created_at"))),
            ("Job", (card.get("job") or {}).get("id")),
            ("Source model", (card.get("source_model") or {}).get("id")),
        ]
    )
    out += ["", "## Intended use", "", card.get("intended_use") or "Not stated.", ""]
    out += ["## Limitations", "", card.get("limitations") or "Not stated.", ""]
    out += ["## Hyperparameters", "", *_table(sorted((card.get("hyperparameters") or {}).items()))]
    data = card.get("training_data") or {}
    out += ["", "## Training data", "", "### Files", ""]
    files = data.get("files") or []
    if files:
        out += ["| role | id | filename | rows | sha256 |", "|---|---|---|---|---|"]
        out += [
            f"| {_cell(f.get('role'))} | {_cell(f.get('id'))} | {_cell(f.get('filename'))} "
            f"| {_cell(f.get('rows'))} | {_cell(f.get('sha256'))} |"
            for f in files
        ]
    else:
        out.append("None.")
    out += ["", "### Dataset versions", ""]
    versions = data.get("dataset_versions") or []
    for v in versions:
        out += [f"- `{v['id']}` (sha256 `{v.get('sha256')}`, {v.get('rows')} rows)"]
        out += [f"  - recipe: `{json.dumps(v.get('recipe'), sort_keys=True)}`"]
        removed = (v.get("preprocessing") or {}).get("removed") or {}
        if removed:
            out += ["  - rows removed: " + ", ".join(f"{k} {n}" for k, n in removed.items())]
    if not versions:
        out.append("None.")
    out += ["", "### Licensed datasets", ""]
    licensed = data.get("licensed_datasets") or []
    for item in licensed:
        out += [f"- **{item.get('title')}** (`{item.get('listing_id')}`): {item.get('terms')}"]
    if not licensed:
        out.append("None.")
    metrics = card.get("metrics") or {}
    out += ["", "## Metrics", ""]
    out += _metrics_lines("Validation", metrics.get("validation"))
    out += _metrics_lines("Test", metrics.get("test"))
    compression = card.get("compression")
    out += ["## Compression", ""]
    if compression:
        source = compression.get("source") or {}
        result = compression.get("result") or {}
        keys = sorted(set(source) | set(result))
        out += ["| measure | source | result |", "|---|---|---|"]
        out += [f"| {_cell(k)} | {_cell(source.get(k))} | {_cell(result.get(k))} |" for k in keys]
    else:
        out.append("None.")
    return "\n".join(out) + "\n"
