"""The cross-tenant registry: every id-bearing endpoint, and how to make its object.

Later issues add their endpoints here; tests/controlplane/test_cross_tenant.py
checks that an outsider gets 404 for each one, and that no id-bearing URL in the
URLconf is missing from this list.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from controlplane.accounts import services as account_services
from controlplane.tenancy import services as tenancy_services

from .budgets import monthly_budget
from .engagements import make_engagement
from .people import SYSTEM, Person


@dataclass(frozen=True)
class Endpoint:
    """A URL with `{id}` placeholders; `make` creates the object in a person's org and
    returns the id (or, for nested URLs, the ids in order)."""

    path: str
    make: Callable[[Person], str | tuple[str, ...]]
    methods: tuple[str, ...]
    body: dict[str, Any] = field(default_factory=dict)

    def url(self, ids: str | tuple[str, ...]) -> str:
        out = self.path
        for one in (ids,) if isinstance(ids, str) else ids:
            out = out.replace("{id}", one, 1)
        return out

    def state_url(self, ids: str | tuple[str, ...]) -> str:
        """Where the owner reads the object, to check an outsider changed nothing."""
        return self.url(ids).removesuffix(self.path.rsplit("{id}", 1)[1])


@dataclass(frozen=True)
class BodyReference:
    """A request that names another object by id in its body.

    `prepare`, if given, readies the attacker (e.g. creates the object the path
    names) and returns the values for the path's `{placeholders}`.
    """

    method: str
    path: str
    body: Callable[[Person], dict[str, Any]]
    prepare: Callable[[Person], dict[str, str]] | None = None

    def url_for(self, attacker: Person) -> str:
        values = self.prepare(attacker) if self.prepare is not None else {}
        return self.path.format(**values)


def make_api_key(person: Person) -> str:
    issued = account_services._issue(
        organization=person.organization,
        name="victim",
        scopes=["all"],
        member=person.membership,
        created_by=person.user,
    )
    return issued.api_key.pk


def make_invite(person: Person) -> str:
    new = tenancy_services.invitation_create(
        organization=person.organization,
        email="invitee@victim.test",
        role="viewer",
        actor_role="owner",
        invited_by_id=person.user.pk,
        actor=SYSTEM,
    )
    return new.invitation.pk


def make_file(person: Person) -> str:
    import io

    from controlplane.datasets import services as dataset_services

    file = dataset_services.file_create(
        organization=person.organization,
        user_id=person.user.pk,
        source=io.BytesIO(b"private rows"),
        size=12,
        filename="secret.txt",
        purpose="user_data",
    )
    return file.pk


def make_batch_file(person: Person) -> str:
    from controlplane.datasets.models import File

    file_id = make_file(person)
    File.objects.for_organization(person.organization).filter(pk=file_id).update(
        purpose="batch", status="processed", validation={"format": "batch", "rows": 1}
    )
    return file_id


def make_batch(person: Person) -> str:
    from datetime import timedelta

    from django.utils import timezone

    from controlplane.batches.models import Batch
    from controlplane.datasets.models import File

    file = File.objects.for_organization(person.organization).get(pk=make_batch_file(person))
    return Batch.objects.create(
        organization=person.organization,
        input_file=file,
        endpoint="/v1/chat/completions",
        expires_at=timezone.now() + timedelta(hours=24),
    ).pk


def make_webhook(person: Person) -> str:
    from controlplane.notifications.services import webhook_create

    return webhook_create(
        organization=person.organization,
        url="https://93.184.216.34/hook",
        events=["*"],
        actor=SYSTEM,
    ).pk


def make_upload(person: Person) -> str:
    from controlplane.datasets import services as dataset_services

    upload = dataset_services.upload_create(
        organization=person.organization,
        user_id=person.user.pk,
        filename="big.jsonl",
        purpose="fine-tune",
        nbytes=10,
        mime_type="",
        sha256="",
    )
    return upload.pk


def make_dataset(person: Person) -> str:
    from controlplane.datasets import services as dataset_services

    return dataset_services.dataset_create(
        organization=person.organization, name="private", description=""
    ).pk


def make_version(person: Person) -> tuple[str, str]:
    from controlplane.datasets.models import DatasetVersion

    dataset_id = make_dataset(person)
    version = DatasetVersion.objects.create(
        organization=person.organization,
        dataset_id=dataset_id,
        number=1,
        format="chat",
        source_files=[],
        status="ready",
    )
    return dataset_id, version.pk


def make_listing(person: Person, *, published: bool = False) -> str:
    """An unpublished listing: published ones are readable by everyone, by design."""
    from decimal import Decimal

    from controlplane.datasets.models import DatasetVersion, Listing

    _, version_id = make_version(person)
    return Listing.objects.create(
        organization=person.organization,
        version=DatasetVersion.objects.for_organization(person.organization).get(pk=version_id),
        title="private",
        license_terms="none",
        price_per_1k_tokens=Decimal("1"),
        published=published,
    ).pk


def make_grant(person: Person) -> str:
    """A request by a third organization on `person`'s (published) listing."""
    from controlplane.datasets.models import AccessGrant, Listing

    from .people import sign_up

    listing = Listing.objects.for_organization(person.organization).get(
        pk=make_listing(person, published=True)
    )
    third = sign_up(f"third-{listing.pk}@third.test", "Third")
    return AccessGrant.objects.create(organization=third.organization, listing=listing).pk


def make_customer_model(person: Person) -> str:
    from .registry import customer_model

    return customer_model(person, suffix="secret").pk


def make_job(person: Person) -> str:
    from controlplane.jobs.models import Job

    from .jobs import register_tiny_llama

    return Job.objects.create(
        organization=person.organization,
        base_model=register_tiny_llama(real=False),
        data_format="chat",
        seed=1,
        hyperparameters={"n_epochs": 1, "batch_size": 1, "learning_rate_multiplier": 1.0},
        status="running",
    ).pk


def make_compression_job(person: Person) -> str:
    from controlplane.core.ids import new_compression_job_id
    from controlplane.jobs.models import Job

    from .jobs import register_tiny_llama

    return Job.objects.create(
        id=new_compression_job_id(),
        kind="compression",
        organization=person.organization,
        base_model=register_tiny_llama(real=False),
        method="quantize",
        task="causal_lm",
        seed=1,
        hyperparameters={"weights": "int8"},
        status="succeeded",
        report={"method": "quantize", "source": {}, "result": {}},
    ).pk


def make_evaluation(person: Person) -> str:
    from controlplane.jobs.evaluation import new_evaluation_job_id
    from controlplane.jobs.models import Job

    from .jobs import register_tiny_llama

    return Job.objects.create(
        id=new_evaluation_job_id(),
        kind="evaluation",
        organization=person.organization,
        base_model=register_tiny_llama(real=False),
        method="evaluate",
        seed=1,
        hyperparameters={"models": ["atelier-tiny-llama"], "batch_size": 8},
        status="running",
    ).pk


def make_processed_file(person: Person) -> str:
    """A training file that passed validation, and a base model to report on it for."""
    from controlplane.datasets.models import File

    from .registry import base_model

    base_model()
    file_id = make_file(person)
    File.objects.for_organization(person.organization).filter(pk=file_id).update(
        purpose="fine-tune", status="processed", validation={"format": "text", "rows": 1}
    )
    return file_id


def make_deployment(person: Person) -> str:
    from controlplane.inference import deployments

    return deployments.deployment_create(
        organization=person.organization,
        user_id=person.user.pk,
        model_id=make_customer_model(person),
        type="dedicated",
        min_replicas=1,
        max_replicas=2,
    ).pk


def make_budget(person: Person) -> str:
    return monthly_budget(person, "10", kind="hard", name="private").pk


def _own_processed_file(attacker: Person) -> dict[str, str]:
    return {"file": make_processed_file(attacker)}


def make_invoice(person: Person) -> str:
    from datetime import UTC, datetime
    from decimal import Decimal

    from controlplane.billing.models import Invoice

    return Invoice.objects.create(
        organization=person.organization,
        period_start=datetime(2026, 1, 1, tzinfo=UTC),
        period_end=datetime(2026, 2, 1, tzinfo=UTC),
        subtotal=Decimal("1.00"),
        total=Decimal("1.00"),
    ).pk


def member_of(person: Person) -> str:
    return person.membership.pk


ENDPOINTS: list[Endpoint] = [
    Endpoint("/v1/organization/invoices/{id}", make_invoice, ("GET",)),
    Endpoint(
        "/v1/organization/api_keys/{id}",
        make_api_key,
        ("GET", "PATCH", "DELETE"),
        {"name": "stolen"},
    ),
    Endpoint("/v1/organization/api_keys/{id}/rotate", make_api_key, ("POST",)),
    Endpoint(
        "/v1/organization/api_keys/{id}/limits",
        make_api_key,
        ("GET", "PUT"),
        {"requests_per_minute": 1},
    ),
    Endpoint(
        "/v1/organization/budgets/{id}", make_budget, ("GET", "PATCH", "DELETE"), {"amount": "1"}
    ),
    Endpoint(
        "/v1/organization/members/{id}", member_of, ("GET", "PATCH", "DELETE"), {"role": "viewer"}
    ),
    Endpoint("/v1/organization/invites/{id}", make_invite, ("GET", "DELETE")),
    Endpoint("/v1/files/{id}", make_file, ("GET", "DELETE")),
    Endpoint("/v1/files/{id}/content", make_file, ("GET",)),
    Endpoint("/v1/files/{id}/validate", make_processed_file, ("POST",), {"model": "test-base"}),
    Endpoint("/v1/batches/{id}", make_batch, ("GET",)),
    Endpoint("/v1/batches/{id}/cancel", make_batch, ("POST",)),
    Endpoint(
        "/v1/webhooks/{id}", make_webhook, ("GET", "POST", "PATCH", "DELETE"), {"enabled": False}
    ),
    Endpoint("/v1/webhooks/{id}/rotate_secret", make_webhook, ("POST",)),
    Endpoint("/v1/webhooks/{id}/deliveries", make_webhook, ("GET",)),
    Endpoint("/v1/uploads/{id}", make_upload, ("GET",)),
    Endpoint("/v1/uploads/{id}/parts", make_upload, ("POST",)),
    Endpoint("/v1/uploads/{id}/complete", make_upload, ("POST",), {"part_ids": ["part_x"]}),
    Endpoint("/v1/uploads/{id}/cancel", make_upload, ("POST",)),
    Endpoint("/v1/datasets/{id}", make_dataset, ("GET",)),
    Endpoint("/v1/datasets/{id}/versions", make_dataset, ("GET", "POST"), {"file_ids": ["file-x"]}),
    Endpoint("/v1/datasets/{id}/versions/{id}", make_version, ("GET",)),
    Endpoint("/v1/catalog/{id}", make_listing, ("GET", "PATCH"), {"published": True}),
    Endpoint("/v1/catalog/{id}/access_requests", make_listing, ("POST",)),
    Endpoint("/v1/catalog/access_requests/{id}", make_grant, ("GET",)),
    Endpoint("/v1/catalog/access_requests/{id}/approve", make_grant, ("POST",)),
    Endpoint("/v1/catalog/access_requests/{id}/decline", make_grant, ("POST",)),
    Endpoint("/v1/models/{id}", make_customer_model, ("GET", "DELETE")),
    Endpoint("/v1/models/{id}/card", make_customer_model, ("GET", "PATCH"), {"intended_use": "x"}),
    Endpoint("/v1/fine_tuning/jobs/{id}", make_job, ("GET",)),
    Endpoint("/v1/fine_tuning/jobs/{id}/cancel", make_job, ("POST",)),
    Endpoint("/v1/fine_tuning/jobs/{id}/pause", make_job, ("POST",)),
    Endpoint("/v1/fine_tuning/jobs/{id}/resume", make_job, ("POST",)),
    Endpoint("/v1/fine_tuning/jobs/{id}/events", make_job, ("GET",)),
    Endpoint("/v1/fine_tuning/jobs/{id}/checkpoints", make_job, ("GET",)),
    Endpoint("/v1/compression/jobs/{id}", make_compression_job, ("GET",)),
    Endpoint("/v1/compression/jobs/{id}/cancel", make_compression_job, ("POST",)),
    Endpoint("/v1/compression/jobs/{id}/events", make_compression_job, ("GET",)),
    Endpoint("/v1/compression/jobs/{id}/report", make_compression_job, ("GET",)),
    Endpoint("/v1/evaluations/{id}", make_evaluation, ("GET",)),
    Endpoint("/v1/evaluations/{id}/cancel", make_evaluation, ("POST",)),
    Endpoint("/v1/evaluations/{id}/events", make_evaluation, ("GET",)),
    Endpoint("/v1/engagements/{id}", make_engagement, ("GET",)),
    Endpoint(
        "/v1/deployments/{id}",
        make_deployment,
        ("GET", "PATCH", "DELETE"),
        {"max_replicas": 3},
    ),
]


def _own_dataset(attacker: Person) -> dict[str, str]:
    return {"dataset": make_dataset(attacker)}


def _as_data_partner(attacker: Person) -> dict[str, str]:
    attacker.organization.is_data_partner = True
    attacker.organization.save()
    return {}


def _with_base_model(attacker: Person) -> dict[str, str]:
    from .jobs import register_tiny_llama

    register_tiny_llama(real=False)  # so a 404 can only come from the foreign id
    return {}


def _victim_validated_file(victim: Person) -> str:
    from controlplane.datasets.models import File

    file_id = make_file(victim)
    File.objects.for_organization(victim.organization).filter(pk=file_id).update(
        purpose="fine-tune", status="processed", validation={"format": "chat", "rows": 3}
    )
    return file_id


BODY_REFERENCES: list[BodyReference] = [
    BodyReference(
        "POST",
        "/v1/batches",
        lambda victim: {
            "input_file_id": make_batch_file(victim),
            "endpoint": "/v1/chat/completions",
            "completion_window": "24h",
        },
    ),
    BodyReference(
        "POST",
        "/v1/files/{file}/validate",
        lambda victim: {"model": make_customer_model(victim)},
        prepare=_own_processed_file,
    ),
    BodyReference(
        "POST",
        "/v1/fine_tuning/jobs",
        lambda victim: {
            "model": "atelier-tiny-llama",
            "training_file": _victim_validated_file(victim),
        },
        prepare=_with_base_model,
    ),
    BodyReference(
        "POST",
        "/v1/fine_tuning/jobs",
        lambda victim: {"model": "atelier-tiny-llama", "dataset": make_version(victim)[1]},
        prepare=_with_base_model,
    ),
    BodyReference(
        "POST",
        "/v1/compression/jobs",
        lambda victim: {"model": make_customer_model(victim), "method": "quantize"},
    ),
    BodyReference(
        "POST",
        "/v1/compression/jobs",
        lambda victim: {
            "model": "atelier-tiny-llama",
            "method": "prune",
            "options": {"sparsity": 0.3},
            "training_file": _victim_validated_file(victim),
        },
        prepare=_with_base_model,
    ),
    BodyReference(
        "POST",
        "/v1/compression/jobs",
        lambda victim: {
            "model": "atelier-tiny-llama",
            "method": "quantize",
            "validation_file": _victim_validated_file(victim),
        },
        prepare=_with_base_model,
    ),
    BodyReference(
        "POST",
        "/v1/compression/jobs",
        lambda victim: {
            "model": "atelier-tiny-llama",
            "method": "distill",
            "options": {"student_layers": 1},
            "dataset": make_version(victim)[1],
        },
        prepare=_with_base_model,
    ),
    BodyReference(
        "POST",
        "/v1/evaluations",
        lambda victim: {"model": "atelier-tiny-llama", "file": _victim_validated_file(victim)},
        prepare=_with_base_model,
    ),
    BodyReference(
        "POST",
        "/v1/evaluations",
        # The models are looked up first: a foreign one is the 404, whatever the file.
        lambda victim: {"models": [make_customer_model(victim)], "file": "file-x"},
    ),
    BodyReference(
        "POST",
        "/v1/deployments",
        lambda victim: {"model": make_customer_model(victim), "type": "serverless"},
    ),
    BodyReference(
        "POST",
        "/v1/organization/budgets",
        lambda victim: {"amount": "5", "api_key_id": make_api_key(victim)},
    ),
    BodyReference(
        "POST",
        "/v1/organization/api_keys",
        lambda victim: {"name": "x", "member_id": victim.membership.pk},
    ),
    BodyReference(
        "POST",
        "/v1/datasets/{dataset}/versions",
        lambda victim: {"file_ids": [make_file(victim)]},
        prepare=_own_dataset,
    ),
    BodyReference(
        "POST",
        "/v1/catalog",
        lambda victim: {
            "dataset_version_id": make_version(victim)[1],
            "title": "x",
            "license_terms": "x",
            "price_per_1k_tokens": "1",
        },
        prepare=_as_data_partner,
    ),
]


@dataclass(frozen=True)
class OwnerOnly:
    """A write on an owner's key or membership that an admin of the same organization
    may not make: a key acts as its member, so holding the owner's would make the admin
    owner. It is in the admin's own organization, so it is a 403 naming the role (never
    the 404 of a foreign id), and nothing changes.

    `make` readies the owner's object and returns the value for the path's `{id}`.
    """

    method: str
    path: str
    make: Callable[[Person], str] = lambda owner: ""
    body: Callable[[Person], dict[str, Any]] = lambda owner: {}


OWNER_ONLY: list[OwnerOnly] = [
    OwnerOnly(
        "POST",
        "/v1/organization/api_keys",
        body=lambda owner: {"name": "x", "member_id": owner.membership.pk},
    ),
    OwnerOnly("PATCH", "/v1/organization/api_keys/{id}", make_api_key, lambda _: {"name": "x"}),
    OwnerOnly("DELETE", "/v1/organization/api_keys/{id}", make_api_key),
    OwnerOnly("POST", "/v1/organization/api_keys/{id}/rotate", make_api_key),
    OwnerOnly(
        "PUT",
        "/v1/organization/api_keys/{id}/limits",
        make_api_key,
        lambda _: {"requests_per_day": 1},
    ),
    OwnerOnly("PATCH", "/v1/organization/members/{id}", member_of, lambda _: {"role": "viewer"}),
    OwnerOnly("DELETE", "/v1/organization/members/{id}", member_of),
]
