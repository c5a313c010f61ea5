"""The alice / bob / charlie trio (owner, teammate, outsider in another organization)."""

from __future__ import annotations

from dataclasses import dataclass

from rest_framework.test import APIClient

from controlplane.accounts import services as account_services
from controlplane.accounts.models import User
from controlplane.audit.services import Actor
from controlplane.tenancy.models import Membership, Organization

PASSWORD = "correct horse battery staple"
SYSTEM = Actor(type="system")


@dataclass
class Person:
    user: User
    organization: Organization
    membership: Membership
    key: str

    @property
    def client(self) -> APIClient:
        return client_with(self.key)


def client_with(key: str | None) -> APIClient:
    client = APIClient()
    if key is not None:
        client.credentials(HTTP_AUTHORIZATION=f"Bearer {key}")
    return client


def sign_up(email: str, organization_name: str, kinds: list[str] | None = None) -> Person:
    result = account_services.user_signup(
        email=email,
        password=PASSWORD,
        organization_name=organization_name,
        kinds=kinds or ["customer"],
        actor=SYSTEM,
    )
    return Person(result.user, result.organization, result.membership, result.issued.value)


def join(organization: Organization, email: str, role: str) -> Person:
    user = User.objects.create_user(email=email, password=PASSWORD)
    membership = Membership.objects.create(organization=organization, user=user, role=role)
    issued = account_services.member_first_key(membership=membership, actor=SYSTEM)
    return Person(user, organization, membership, issued.value)
