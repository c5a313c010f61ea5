"""`/v1/catalog`: browse, publish, request access, decide, and see usage (partners)."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from django.db.models import Sum
from drf_spectacular.utils import extend_schema
from rest_framework import serializers
from rest_framework.request import Request
from rest_framework.response import Response

from controlplane.core.errors import ApiError
from controlplane.core.pagination import list_response, paginate
from controlplane.core.serializers import StrictInputSerializer, unix, validated

from . import catalog
from .apis import FilesApi
from .models import AccessGrant, Listing, PartnerUsage


def listing_out(listing: Listing) -> dict[str, Any]:
    return {
        "id": listing.pk,
        "object": "catalog.listing",
        "partner_id": listing.organization_id,
        "title": listing.title,
        "description": listing.description,
        "license_terms": listing.license_terms,
        "sample_rows": listing.sample_rows,
        "format": listing.version.format,
        "rows": listing.version.rows,
        "dataset_version_id": listing.version_id,
        "price_per_1k_tokens": str(listing.price_per_1k_tokens),
        "auto_approve": listing.auto_approve,
        "published": listing.published,
        "created_at": unix(listing.created_at),
    }


def grant_out(grant: AccessGrant) -> dict[str, Any]:
    return {
        "id": grant.pk,
        "object": "catalog.access_request",
        "listing_id": grant.listing_id,
        "customer_id": grant.organization_id,
        "status": grant.status,
        "note": grant.note,
        "created_at": unix(grant.created_at),
        "decided_at": unix(grant.decided_at),
    }


class CatalogListPublishApi(FilesApi):
    class InputSerializer(StrictInputSerializer):
        class Meta:
            ref_name = "ListingPublishRequest"

        dataset_version_id = serializers.CharField(max_length=40)
        title = serializers.CharField(max_length=200)
        description = serializers.CharField(
            max_length=10000, required=False, default="", allow_blank=True
        )
        license_terms = serializers.CharField(max_length=20000)
        price_per_1k_tokens = serializers.DecimalField(
            max_digits=12, decimal_places=6, min_value=Decimal(0)
        )
        sample_rows = serializers.ListField(
            child=serializers.JSONField(),
            required=False,
            allow_null=True,
            default=None,
            max_length=20,
        )
        auto_approve = serializers.BooleanField(required=False, default=False)

    @extend_schema(responses={200: dict}, operation_id="list_catalog")
    def get(self, request: Request) -> Response:
        rows, has_more = paginate(catalog.published_listings().select_related("version"), request)
        return list_response(rows, has_more, listing_out)

    @extend_schema(request=InputSerializer, responses={201: dict})
    def post(self, request: Request) -> Response:
        data = validated(self.InputSerializer, request.data)
        listing = catalog.listing_publish(
            organization=self.organization,
            version_id=data["dataset_version_id"],
            title=data["title"],
            description=data["description"],
            license_terms=data["license_terms"],
            price_per_1k_tokens=data["price_per_1k_tokens"],
            sample_rows=data["sample_rows"],
            auto_approve=data["auto_approve"],
        )
        return Response(listing_out(listing), status=201)


class CatalogDetailApi(FilesApi):
    class InputSerializer(StrictInputSerializer):
        class Meta:
            ref_name = "ListingUpdateRequest"

        title = serializers.CharField(max_length=200, required=False)
        description = serializers.CharField(max_length=10000, required=False, allow_blank=True)
        license_terms = serializers.CharField(max_length=20000, required=False)
        price_per_1k_tokens = serializers.DecimalField(
            max_digits=12, decimal_places=6, min_value=Decimal(0), required=False
        )
        auto_approve = serializers.BooleanField(required=False)
        published = serializers.BooleanField(required=False)

    @extend_schema(responses={200: dict})
    def get(self, request: Request, listing_id: str) -> Response:
        return Response(
            listing_out(
                catalog.listing_visible(organization=self.organization, listing_id=listing_id)
            )
        )

    @extend_schema(request=InputSerializer, responses={200: dict})
    def patch(self, request: Request, listing_id: str) -> Response:
        listing = self.get_owned(Listing, listing_id, label="listing")  # partners edit their own
        data = validated(self.InputSerializer, request.data)
        return Response(listing_out(catalog.listing_update(listing=listing, changes=data)))


class CatalogAccessRequestApi(FilesApi):
    class InputSerializer(StrictInputSerializer):
        class Meta:
            ref_name = "AccessRequestRequest"

        note = serializers.CharField(max_length=2000, required=False, default="", allow_blank=True)

    @extend_schema(request=InputSerializer, responses={200: dict})
    def post(self, request: Request, listing_id: str) -> Response:
        data = validated(self.InputSerializer, request.data or {})
        grant = catalog.access_request(
            organization=self.organization, listing_id=listing_id, note=data["note"]
        )
        return Response(grant_out(grant))


class AccessRequestListApi(FilesApi):
    """`?as=customer` (default): requests this organization made; `?as=partner`: requests
    other organizations made for this partner's listings."""

    @extend_schema(responses={200: dict}, operation_id="list_access_requests")
    def get(self, request: Request) -> Response:
        side = request.query_params.get("as", "customer")
        if side == "partner":
            queryset = catalog.requests_for_partner(self.organization)
        elif side == "customer":
            queryset = AccessGrant.objects.for_organization(self.organization)
        else:
            raise ApiError("'as' must be 'customer' or 'partner'.", param="as")
        rows, has_more = paginate(queryset, request)
        return list_response(rows, has_more, grant_out)


class AccessRequestDetailApi(FilesApi):
    @extend_schema(responses={200: dict})
    def get(self, request: Request, grant_id: str) -> Response:
        return Response(
            grant_out(
                catalog.access_request_visible(organization=self.organization, grant_id=grant_id)
            )
        )


class AccessDecideApi(FilesApi):
    decision = ""

    @extend_schema(request=None, responses={200: dict})
    def post(self, request: Request, grant_id: str) -> Response:
        grant = catalog.access_decide(
            partner=self.organization, grant_id=grant_id, approve=self.decision == "approve"
        )
        return Response(grant_out(grant))


class CatalogUsageApi(FilesApi):
    """Tokens trained on this partner's listings, per job, with the amount earned."""

    @extend_schema(responses={200: dict}, operation_id="catalog_usage")
    def get(self, request: Request) -> Response:
        queryset = PartnerUsage.objects.for_organization(self.organization)
        listing = request.query_params.get("listing_id")
        if listing:
            queryset = queryset.filter(listing_id=listing)
        totals = queryset.aggregate(tokens=Sum("trained_tokens"), amount=Sum(PartnerUsage.AMOUNT))
        rows, has_more = paginate(queryset, request)
        response = list_response(rows, has_more, usage_out)
        response.data["total_trained_tokens"] = totals["tokens"] or 0
        response.data["total_amount"] = _money(totals["amount"] or Decimal(0))
        return response


def _money(value: Decimal) -> str:
    return str(value.quantize(Decimal("0.000001")))


def usage_out(usage: PartnerUsage) -> dict[str, Any]:
    return {
        "id": usage.pk,
        "object": "catalog.usage",
        "listing_id": usage.listing_id,
        "customer_id": usage.customer_id,
        "job_id": usage.job_id,
        "trained_tokens": usage.trained_tokens,
        "price_per_1k_tokens": str(usage.price_per_1k_tokens),
        "amount": _money(usage.amount),
        "created_at": unix(usage.created_at),
    }
