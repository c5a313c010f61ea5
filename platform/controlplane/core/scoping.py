"""Tenancy by construction: organization-owned rows cannot be queried without an organization.

`Model.objects.for_organization(org)` is the only ordinary way in;
`Model.objects.all()` / `.filter()` / `.get()` raise `UnscopedQueryError`.
The escape hatch, `Model.objects.dangerously_unscoped()`, is named to stand out
in review: authentication (which finds the organization) and staff tooling use it.
Reverse relations (`organization.memberships`) stay usable: they are scoped by
the organization they hang from.
"""

from __future__ import annotations

from typing import Any, Generic, TypeVar

from django.db import models

M = TypeVar("M", bound=models.Model)


class UnscopedQueryError(RuntimeError):
    """A query on an organization-owned model without an organization."""


class OrganizationScopedManager(models.Manager[M], Generic[M]):
    def get_queryset(self) -> models.QuerySet[M]:
        raise UnscopedQueryError(
            f"{self.model.__name__}.objects needs an organization: use "
            f"{self.model.__name__}.objects.for_organization(org) "
            "(or dangerously_unscoped() where crossing tenants is the point)."
        )

    def for_organization(self, organization: models.Model | str) -> models.QuerySet[M]:
        if organization is None or organization == "":
            raise UnscopedQueryError(f"{self.model.__name__}: organization is empty.")
        return super().get_queryset().filter(organization=organization)

    def locked(self, obj: M) -> M:
        """`obj` re-read under SELECT … FOR UPDATE, within its own organization."""
        org_id = obj.organization_id  # type: ignore[attr-defined]
        return self.for_organization(org_id).select_for_update().get(pk=obj.pk)

    def dangerously_unscoped(self) -> models.QuerySet[M]:
        return super().get_queryset()

    def create(self, **kwargs: Any) -> M:
        if kwargs.get("organization") is None and kwargs.get("organization_id") is None:
            raise UnscopedQueryError(f"{self.model.__name__} must be created in an organization.")
        obj = self.model(**kwargs)
        obj.save(force_insert=True, using=self.db)
        return obj


class OrganizationOwned(models.Model):
    """Base of every model that belongs to one organization (`tenancy.Organization`, named
    by label: core sits below every app and imports none of them)."""

    organization = models.ForeignKey(
        "tenancy.Organization", on_delete=models.CASCADE, related_name="%(class)ss"
    )

    objects: OrganizationScopedManager[Any] = OrganizationScopedManager()
    # Plain manager for Django internals (admin, related managers, unique checks).
    _plain = models.Manager()

    class Meta:
        abstract = True
        default_manager_name = "_plain"
