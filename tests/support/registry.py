"""Model registry test data: base models (no files needed unless a test reads them) and
customer models registered the way the jobs app registers them."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from controlplane.core.ids import new_id
from controlplane.modelregistry import services
from controlplane.modelregistry.models import BaseModel, CustomerModel

from .people import Person


def base_model(name: str = "test-base", **fields: Any) -> BaseModel:
    defaults: dict[str, Any] = {
        "family": "llama",
        "tasks": ["causal_lm", "classification"],
        "methods": ["supervised", "dpo"],
        "adapters": ["lora", "full"],
        "context_length": 256,
        "uri": f"file:///nonexistent/{name}",
        "price_per_1k_training_tokens": Decimal("0.000800"),
        **fields,
    }
    model, _ = BaseModel.objects.get_or_create(id=name, defaults=defaults)
    return model


def customer_model(
    person: Person,
    *,
    base: BaseModel | None = None,
    job_id: str | None = None,
    suffix: str = "",
    kind: str = "final",
    step: int | None = None,
    uri: str | None = None,
) -> CustomerModel:
    job_id = job_id or new_id("ftjob").replace("ftjob_", "ftjob-", 1)
    return services.customer_model_register(
        organization=person.organization,
        base=base or base_model(),
        job_id=job_id,
        suffix=suffix,
        kind=kind,
        step=step,
        uri=uri or f"file:///nonexistent/{job_id}/final",
        artifact_kind="lora",
        task="causal_lm",
        labels=[],
    )
