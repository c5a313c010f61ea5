"""The data-partner catalog: publishing, access requests and grants, usage for royalties.

Published listings are the one place where one organization reads another's
rows, and only the partner-chosen sample: the raw version stays readable by its
owner alone, and by a customer's jobs once a grant is approved (usable_version).
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import orjson
from django.db import IntegrityError, transaction
from django.db.models import Q, QuerySet
from django.utils import timezone

from controlplane.billing import meters
from controlplane.core.errors import ApiError, Conflict, NotFound
from controlplane.tenancy.models import Organization

from . import storage
from .models import (
    AccessGrant,
    AccessStatus,
    DatasetVersion,
    Listing,
    PartnerUsage,
    VersionStatus,
)

SAMPLE_ROWS_DEFAULT = 5
SAMPLE_ROWS_MAX = 20
SAMPLE_ROW_MAX_BYTES = 16 * 1024


def _not_found(kind: str, pk: str) -> NotFound:
    return NotFound(f"No {kind} with id '{pk}' found.", param="id")


def published_listings() -> QuerySet[Listing]:
    """Every organization's published listings: the catalog is public by design."""
    return Listing.objects.dangerously_unscoped().filter(published=True)


def listing_visible(*, organization: Organization, listing_id: str) -> Listing:
    """A listing the caller may see: published, or its own."""
    listing = (
        Listing.objects.dangerously_unscoped()
        .filter(Q(published=True) | Q(organization=organization), pk=listing_id)
        .first()
    )
    if listing is None:
        raise _not_found("listing", listing_id)
    return listing


def _first_rows(version: DatasetVersion, n: int) -> list[Any]:
    rows: list[Any] = []
    with storage.open_object(version.storage_name) as stream:
        for line in stream:
            if line.strip():
                rows.append(orjson.loads(line))
            if len(rows) >= n:
                break
    return rows


@transaction.atomic
def listing_publish(
    *,
    organization: Organization,
    version_id: str,
    title: str,
    description: str,
    license_terms: str,
    price_per_1k_tokens: Decimal,
    sample_rows: list[Any] | None,
    auto_approve: bool,
) -> Listing:
    if not organization.is_data_partner:
        raise ApiError(
            "Only data partners publish to the catalog: make the organization a "
            "'data_partner' first (PATCH /v1/organization).",
            status_code=403,
            code="not_a_data_partner",
        )
    version = DatasetVersion.objects.for_organization(organization).filter(pk=version_id).first()
    if version is None:
        raise NotFound(
            f"No dataset version with id '{version_id}' found.", param="dataset_version_id"
        )
    if version.status != VersionStatus.READY:
        raise Conflict(
            "Only a ready dataset version can be published.",
            param="dataset_version_id",
            code="version_not_ready",
        )
    if sample_rows is None:
        sample_rows = _first_rows(version, SAMPLE_ROWS_DEFAULT) if version.format != "csv" else []
    if len(sample_rows) > SAMPLE_ROWS_MAX or any(
        len(orjson.dumps(r)) > SAMPLE_ROW_MAX_BYTES for r in sample_rows
    ):
        raise ApiError(
            f"At most {SAMPLE_ROWS_MAX} sample rows of {SAMPLE_ROW_MAX_BYTES} bytes each.",
            param="sample_rows",
        )
    return Listing.objects.create(
        organization=organization,
        version=version,
        title=title,
        description=description,
        license_terms=license_terms,
        sample_rows=sample_rows,
        price_per_1k_tokens=price_per_1k_tokens,
        auto_approve=auto_approve,
    )


@transaction.atomic
def listing_update(*, listing: Listing, changes: dict[str, Any]) -> Listing:
    listing = Listing.objects.locked(listing)
    for field in (
        "title",
        "description",
        "license_terms",
        "auto_approve",
        "published",
        "price_per_1k_tokens",
    ):
        if field in changes:
            setattr(listing, field, changes[field])
    listing.save()
    return listing


def access_request(*, organization: Organization, listing_id: str, note: str) -> AccessGrant:
    """Ask for a listing; approved at once when the partner set auto-approval. Idempotent."""
    listing = listing_visible(organization=organization, listing_id=listing_id)
    if listing.organization_id == organization.pk:
        raise ApiError("This is your own listing.", param="listing_id", code="own_listing")
    existing = AccessGrant.objects.for_organization(organization).filter(listing=listing).first()
    if existing is not None:
        return existing
    status = AccessStatus.APPROVED if listing.auto_approve else AccessStatus.PENDING
    try:
        with transaction.atomic():
            return AccessGrant.objects.create(
                organization=organization,
                listing=listing,
                status=status,
                note=note,
                decided_at=timezone.now() if status == AccessStatus.APPROVED else None,
            )
    except IntegrityError:  # a concurrent request won
        return AccessGrant.objects.for_organization(organization).get(listing=listing)


def requests_for_partner(partner: Organization) -> QuerySet[AccessGrant]:
    """Requests on the partner's listings (they belong to the customers who made them)."""
    return AccessGrant.objects.dangerously_unscoped().filter(listing__organization=partner)


def access_request_visible(*, organization: Organization, grant_id: str) -> AccessGrant:
    """A request the caller made, or one made on the caller's listings."""
    grant = (
        AccessGrant.objects.dangerously_unscoped()
        .filter(Q(organization=organization) | Q(listing__organization=organization), pk=grant_id)
        .first()
    )
    if grant is None:
        raise _not_found("access request", grant_id)
    return grant


@transaction.atomic
def access_decide(*, partner: Organization, grant_id: str, approve: bool) -> AccessGrant:
    grant = (
        requests_for_partner(partner).select_for_update(of=("self",)).filter(pk=grant_id).first()
    )
    if grant is None:
        raise _not_found("access request", grant_id)
    grant.status = AccessStatus.APPROVED if approve else AccessStatus.DECLINED
    grant.decided_at = timezone.now()
    grant.save(update_fields=["status", "decided_at"])
    return grant


def usable_version(*, organization: Organization, version_id: str) -> DatasetVersion:
    """A version a job of `organization` may train on: its own, or a partner's it holds an
    approved grant for. Anything else is a 404, like a version that does not exist."""
    own = DatasetVersion.objects.for_organization(organization).filter(pk=version_id).first()
    if own is not None:
        return own
    granted = (
        AccessGrant.objects.for_organization(organization)
        .filter(status=AccessStatus.APPROVED, listing__version_id=version_id)
        .select_related("listing__version")
        .first()
    )
    if granted is None:
        raise _not_found("dataset version", version_id)
    return granted.listing.version


def usage_record(
    *, customer: Organization, version: DatasetVersion, job_id: str, trained_tokens: int
) -> list[PartnerUsage]:
    """Credit the partners whose listings a job trained on. Once per (job, listing)."""
    recorded = []
    grants = (
        AccessGrant.objects.for_organization(customer)
        .filter(status=AccessStatus.APPROVED, listing__version=version)
        .select_related("listing")
    )
    for grant in grants:
        usage, _ = PartnerUsage.objects.dangerously_unscoped().get_or_create(
            job_id=job_id,
            listing=grant.listing,
            defaults={
                "organization_id": grant.listing.organization_id,
                "customer": customer,
                "trained_tokens": trained_tokens,
                "price_per_1k_tokens": grant.listing.price_per_1k_tokens,
            },
        )
        meters.royalty_to_ledger(
            partner_id=usage.organization_id,
            listing_id=usage.listing_id,
            job_id=job_id,
            customer_id=customer.pk,
            trained_tokens=usage.trained_tokens,
            price_per_1k_tokens=usage.price_per_1k_tokens,
            at=usage.created_at,
        )
        recorded.append(usage)
    return recorded
