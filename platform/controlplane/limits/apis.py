"""Rate limits of keys, the caller's current limits, and budgets (`/v1/organization/…`)."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from asgiref.sync import async_to_sync
from drf_spectacular.utils import extend_schema
from rest_framework import serializers
from rest_framework.request import Request
from rest_framework.response import Response

from controlplane.accounts.apis_base import PrincipalApi
from controlplane.accounts.models import APIKey
from controlplane.audit.services import Actor
from controlplane.core.errors import ApiError
from controlplane.core.pagination import list_response, paginate
from controlplane.core.serializers import StrictInputSerializer, validated
from controlplane.tenancy.apis_base import OrganizationApi

from . import services
from .budgets import MAX_AMOUNT
from .models import Budget, BudgetKind, BudgetPeriod
from .ratelimit import RateLimitExceeded, acheck
from .resolve import limits_for
from .selectors import budget_out, key_limits_out, rate_limits_out

#: Highest limit one can set: far above any plan, low enough to catch typos' extra zeros.
MAX_LIMIT = 1_000_000_000


def _limit_field() -> serializers.IntegerField:
    return serializers.IntegerField(
        required=False, allow_null=True, min_value=1, max_value=MAX_LIMIT, default=None
    )


class KeyLimitsApi(PrincipalApi):
    """GET a key's rate limits; PUT replaces its overrides (null or absent: the plan's value)."""

    scopes = {"read": "organization.read", "write": "organization.write"}

    class InputSerializer(StrictInputSerializer):
        class Meta:
            ref_name = "KeyLimitsRequest"

        requests_per_minute = _limit_field()
        tokens_per_minute = _limit_field()
        requests_per_day = _limit_field()

    @extend_schema(responses={200: dict})
    def get(self, request: Request, key_id: str) -> Response:
        return Response(key_limits_out(self.get_owned(APIKey, key_id, label="API key")))

    @extend_schema(request=InputSerializer, responses={200: dict})
    def put(self, request: Request, key_id: str) -> Response:
        api_key = self.get_owned(APIKey, key_id, label="API key")
        data = validated(self.InputSerializer, request.data)
        services.key_limits_set(
            api_key=api_key,
            values=data,
            actor=Actor.from_request(request),
            principal=self.principal,
        )
        return Response(key_limits_out(api_key))


class RateLimitsApi(PrincipalApi):
    """The caller's key's limits and what is left of them. Counts as one request itself,
    so it answers with the same headers (and the same 429) as any limited endpoint."""

    scopes = {"read": "organization.read"}

    @extend_schema(responses={200: dict})
    def get(self, request: Request) -> Response:
        key = self.principal.api_key
        limits = limits_for(organization_id=key.organization_id, api_key_id=key.pk)
        try:
            decision = async_to_sync(acheck)(
                organization_id=key.organization_id, api_key_id=key.pk, tokens=0, limits=limits
            )
        except RateLimitExceeded as exc:
            response = self.handle_exception(exc)
            for name, value in exc.headers().items():
                response[name] = value
            return response
        return Response(rate_limits_out(decision), headers=decision.headers())


_AMOUNT = {
    "max_digits": 14,
    "decimal_places": 6,
    "min_value": Decimal("0.000001"),
    "max_value": MAX_AMOUNT,
}


def _thresholds(**kwargs: Any) -> serializers.ListField:
    """Percentages of the amount at which to alert (each once per period)."""
    return serializers.ListField(
        child=serializers.IntegerField(min_value=1, max_value=100), max_length=10, **kwargs
    )


class BudgetListCreateApi(OrganizationApi):
    scopes = {"read": "billing.read", "write": "billing.write"}

    class InputSerializer(StrictInputSerializer):
        class Meta:
            ref_name = "BudgetCreateRequest"

        name = serializers.CharField(max_length=100, required=False, default="", allow_blank=True)
        api_key_id = serializers.CharField(max_length=40, required=False, allow_null=True)
        amount = serializers.DecimalField(**_AMOUNT)  # type: ignore[arg-type]
        kind = serializers.ChoiceField(choices=BudgetKind.choices, default=BudgetKind.HARD)
        period = serializers.ChoiceField(choices=BudgetPeriod.choices, default=BudgetPeriod.MONTH)
        period_days = serializers.IntegerField(
            min_value=1, max_value=366, required=False, allow_null=True
        )
        anchor = serializers.DateTimeField(required=False, allow_null=True)
        alert_thresholds = _thresholds(required=False, default=[80])

    @extend_schema(responses={200: dict}, operation_id="list_budgets")
    def get(self, request: Request) -> Response:
        rows, has_more = paginate(Budget.objects.for_organization(self.organization), request)
        return list_response(rows, has_more, budget_out)

    @extend_schema(request=InputSerializer, responses={201: dict})
    def post(self, request: Request) -> Response:
        data = validated(self.InputSerializer, request.data)
        _check_period(data["period"], data.get("period_days"))
        api_key = None
        if data.get("api_key_id"):
            api_key = self.get_owned(APIKey, data["api_key_id"], label="API key")
        budget = services.budget_create(
            organization=self.organization,
            api_key=api_key,
            name=data["name"],
            amount=data["amount"],
            kind=data["kind"],
            period=data["period"],
            period_days=data.get("period_days"),
            anchor=data.get("anchor"),
            alert_thresholds=data["alert_thresholds"],
            actor=Actor.from_request(request),
        )
        return Response(budget_out(budget), status=201)


def _check_period(period: str, period_days: int | None) -> None:
    if period == BudgetPeriod.DAYS and not period_days:
        raise ApiError(
            "A budget with period 'days' needs 'period_days' (1 to 366).", param="period_days"
        )
    if period == BudgetPeriod.MONTH and period_days:
        raise ApiError(
            "'period_days' applies only to period 'days'; calendar-month budgets reset on the "
            "1st (UTC). Remove 'period_days' or set period to 'days'.",
            param="period_days",
        )


class BudgetDetailApi(OrganizationApi):
    scopes = {"read": "billing.read", "write": "billing.write"}

    class InputSerializer(StrictInputSerializer):
        class Meta:
            ref_name = "BudgetUpdateRequest"

        name = serializers.CharField(max_length=100, required=False, allow_blank=True)
        amount = serializers.DecimalField(required=False, **_AMOUNT)  # type: ignore[arg-type]
        kind = serializers.ChoiceField(choices=BudgetKind.choices, required=False)
        period = serializers.ChoiceField(choices=BudgetPeriod.choices, required=False)
        period_days = serializers.IntegerField(
            min_value=1, max_value=366, required=False, allow_null=True
        )
        anchor = serializers.DateTimeField(required=False)
        alert_thresholds = _thresholds(required=False)

    @extend_schema(responses={200: dict})
    def get(self, request: Request, budget_id: str) -> Response:
        return Response(budget_out(self.get_owned(Budget, budget_id, label="budget")))

    @extend_schema(request=InputSerializer, responses={200: dict})
    def patch(self, request: Request, budget_id: str) -> Response:
        budget = self.get_owned(Budget, budget_id, label="budget")
        changes: dict[str, Any] = validated(self.InputSerializer, request.data)
        period = changes.get("period", budget.period)
        if period == BudgetPeriod.MONTH and "period" in changes:
            changes.setdefault("period_days", None)
        _check_period(period, changes.get("period_days", budget.period_days))
        budget = services.budget_update(
            budget=budget, changes=changes, actor=Actor.from_request(request)
        )
        return Response(budget_out(budget))

    @extend_schema(responses={200: dict})
    def delete(self, request: Request, budget_id: str) -> Response:
        budget = self.get_owned(Budget, budget_id, label="budget")
        services.budget_delete(budget=budget, actor=Actor.from_request(request))
        return Response({"object": "organization.budget.deleted", "id": budget_id, "deleted": True})
