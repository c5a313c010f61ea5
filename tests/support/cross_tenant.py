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
    """A request that names another object by id in its body."""

    method: str
    path: str
    body: Callable[[Person], dict[str, Any]]


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


def member_of(person: Person) -> str:
    return person.membership.pk


ENDPOINTS: list[Endpoint] = [
    Endpoint(
        "/v1/organization/api_keys/{id}",
        make_api_key,
        ("GET", "PATCH", "DELETE"),
        {"name": "stolen"},
    ),
    Endpoint("/v1/organization/api_keys/{id}/rotate", make_api_key, ("POST",)),
    Endpoint(
        "/v1/organization/members/{id}", member_of, ("GET", "PATCH", "DELETE"), {"role": "viewer"}
    ),
    Endpoint("/v1/organization/invites/{id}", make_invite, ("GET", "DELETE")),
    Endpoint("/v1/files/{id}", make_file, ("GET", "DELETE")),
    Endpoint("/v1/files/{id}/content", make_file, ("GET",)),
    Endpoint("/v1/uploads/{id}", make_upload, ("GET",)),
    Endpoint("/v1/uploads/{id}/parts", make_upload, ("POST",)),
    Endpoint("/v1/uploads/{id}/complete", make_upload, ("POST",), {"part_ids": ["part_x"]}),
    Endpoint("/v1/uploads/{id}/cancel", make_upload, ("POST",)),
    Endpoint("/v1/datasets/{id}", make_dataset, ("GET",)),
    Endpoint("/v1/datasets/{id}/versions", make_dataset, ("GET", "POST"), {"file_ids": ["file-x"]}),
    Endpoint("/v1/datasets/{id}/versions/{id}", make_version, ("GET",)),
]

BODY_REFERENCES: list[BodyReference] = [
    BodyReference(
        "POST",
        "/v1/organization/api_keys",
        lambda victim: {"name": "x", "member_id": victim.membership.pk},
    ),
]
