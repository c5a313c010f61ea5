"""Customers read their engagements (`/v1/engagements`): status, milestones, delivered models,
events. Never the internal notes, the budget or staff identities beyond a display name."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from django.db.models import Prefetch, QuerySet
from drf_spectacular.utils import extend_schema
from rest_framework.request import Request
from rest_framework.response import Response

from controlplane.core.pagination import list_response, paginate
from controlplane.core.serializers import unix
from controlplane.modelregistry.models import CustomerModel, ModelKind
from controlplane.tenancy.apis_base import OrganizationApi

from .models import Engagement, EngagementEvent, Milestone

#: Events shown per engagement, newest first.
EVENTS_SHOWN = 50


def milestone_out(milestone: Milestone) -> dict[str, Any]:
    return {
        "id": milestone.pk,
        "object": "engagement.milestone",
        "title": milestone.title,
        "due_date": milestone.due_date.isoformat() if milestone.due_date else None,
        "amount": {"value": str(milestone.amount), "currency": "usd"},
        "status": milestone.status,
    }


def event_out(event: EngagementEvent) -> dict[str, Any]:
    return {
        "id": event.pk,
        "object": "engagement.event",
        "created_at": unix(event.created_at),
        "kind": event.kind,
        "message": event.message,
    }


def engagement_out(engagement: Engagement, delivered: Sequence[CustomerModel]) -> dict[str, Any]:
    return {
        "id": engagement.pk,
        "object": "engagement",
        "title": engagement.title,
        "scope": engagement.scope,
        "status": engagement.status,
        "owner": {"name": engagement.owner_name},
        "created_at": unix(engagement.created_at),
        "updated_at": unix(engagement.updated_at),
        "milestones": [milestone_out(m) for m in engagement.milestones.all()],
        "delivered_models": [
            {"id": m.pk, "object": "model", "delivered_at": unix(m.delivered_at)} for m in delivered
        ],
        "events": [event_out(e) for e in getattr(engagement, "recent_events", [])],
    }


def _readable(queryset: QuerySet[Engagement]) -> QuerySet[Engagement]:
    return queryset.select_related("owner").prefetch_related(
        Prefetch("milestones", queryset=Milestone._plain.order_by("due_date", "id")),
        Prefetch(
            "events",
            queryset=EngagementEvent._plain.order_by("-id")[:EVENTS_SHOWN],
            to_attr="recent_events",
        ),
    )


def _delivered(organization: Any, engagements: Sequence[Engagement]) -> dict[str, list[Any]]:
    """Each engagement's delivered models, in one query for the page."""
    out: dict[str, list[CustomerModel]] = defaultdict(list)
    models = (
        CustomerModel.objects.for_organization(organization)
        .filter(
            engagement_id__in=[e.pk for e in engagements],
            delivered_at__isnull=False,
            deleted_at__isnull=True,
            kind__in=[ModelKind.FINAL, ModelKind.COMPRESSED],
        )
        .order_by("delivered_at", "pk")
    )
    for model in models:
        out[str(model.engagement_id)].append(model)
    return out


class EngagementsApi(OrganizationApi):
    # Every member may follow the organization's engagements; nothing here writes.
    scopes = {"read": "organization.read", "write": "organization.write"}


class EngagementListApi(EngagementsApi):
    @extend_schema(
        operation_id="list_engagements",
        summary="List the organization's custom engagements",
        description=(
            "Newest first, paginated with `after` and `limit`. Each engagement has its "
            "status, milestones (title, due date, amount, status), delivered models, the "
            f"latest {EVENTS_SHOWN} events and its owner's display name."
        ),
        responses={200: dict},
    )
    def get(self, request: Request) -> Response:
        queryset = _readable(Engagement.objects.for_organization(self.organization))
        rows, has_more = paginate(queryset, request)
        delivered = _delivered(self.organization, rows)
        return list_response(rows, has_more, lambda e: engagement_out(e, delivered[e.pk]))


class EngagementDetailApi(EngagementsApi):
    @extend_schema(
        operation_id="retrieve_engagement",
        summary="Retrieve one custom engagement",
        description="Another organization's engagement, like a missing one, is a 404.",
        responses={200: dict},
    )
    def get(self, request: Request, engagement_id: str) -> Response:
        engagement = self.get_owned(Engagement, engagement_id, label="engagement")
        engagement = _readable(Engagement.objects.for_organization(self.organization)).get(
            pk=engagement.pk
        )
        delivered = _delivered(self.organization, [engagement])
        return Response(engagement_out(engagement, delivered[engagement.pk]))
