"""The tenant endpoint base, for endpoints that act on the calling key itself."""

from __future__ import annotations

from typing import cast

from controlplane.tenancy.apis_base import OrganizationApi

from .authentication import Principal


class PrincipalApi(OrganizationApi):
    """`OrganizationApi` whose `principal` is the `Principal` key authentication made:
    its API key as well as its organization, member, role and scopes."""

    @property
    def principal(self) -> Principal:
        return cast(Principal, self.request.user)
