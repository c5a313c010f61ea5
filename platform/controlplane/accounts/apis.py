"""Sign-up, joining by invitation, the caller's identity, and API keys
(`/v1/organization/api_keys`)."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from drf_spectacular.utils import extend_schema, inline_serializer
from rest_framework import serializers, status
from rest_framework.permissions import AllowAny
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.throttling import ScopedRateThrottle
from rest_framework.views import APIView

from controlplane.audit.services import Actor
from controlplane.core.errors import ApiError
from controlplane.core.pagination import list_response, paginate
from controlplane.core.serializers import StrictInputSerializer, unix, validated
from controlplane.tenancy.models import ORGANIZATION_KINDS, Membership
from controlplane.tenancy.roles import MANAGERS
from controlplane.tenancy.serializers import member_out, organization_out

from . import services
from .apis_base import PrincipalApi
from .models import APIKey
from .selectors import api_keys_with_status


def api_key_out(api_key: APIKey, *, value: str | None = None) -> dict[str, Any]:
    """OpenAI's admin-key shape, plus our scopes, status and rotation fields."""
    out: dict[str, Any] = {
        "object": "organization.api_key",
        "id": api_key.pk,
        "name": api_key.name,
        "redacted_value": api_key.redacted_value,
        "scopes": api_key.scopes,
        "status": api_key.status,
        "member_id": api_key.member_id,
        "owner": {
            "type": "user" if api_key.member_id else "service_account",
            "id": api_key.member_id,
        },
        "created_at": unix(api_key.created_at),
        "expires_at": unix(api_key.expires_at),
        "last_used_at": unix(api_key.last_used_at),
        "revoked_at": unix(api_key.revoked_at),
        "rotated_at": unix(api_key.rotated_at),
        "rotated_to": api_key.rotated_to_id,
    }
    if value is not None:
        out["value"] = value  # shown once, at creation; never stored
    return out


class SignupApi(APIView):
    """Create an account, an organization it owns, and a first API key."""

    authentication_classes: list[Any] = []
    permission_classes = [AllowAny]
    throttle_classes = [ScopedRateThrottle]
    throttle_scope = "signup"

    class InputSerializer(StrictInputSerializer):
        class Meta:
            ref_name = "SignupRequest"

        email = serializers.EmailField(max_length=254)
        password = serializers.CharField(max_length=256, trim_whitespace=False)
        organization_name = serializers.CharField(max_length=200)
        kinds = serializers.ListField(
            child=serializers.ChoiceField(choices=ORGANIZATION_KINDS),
            required=False,
            default=["customer"],
            min_length=1,
        )

    @extend_schema(request=InputSerializer, responses={201: dict}, auth=[])
    def post(self, request: Request) -> Response:
        data = validated(self.InputSerializer, request.data)
        result = services.user_signup(
            email=data["email"],
            password=data["password"],
            organization_name=data["organization_name"],
            kinds=data["kinds"],
            actor=Actor.from_request(request),
        )
        return Response(
            {
                "object": "signup",
                "user": {"id": result.user.pk, "email": result.user.email},
                "organization": organization_out(result.organization),
                "member_id": result.membership.pk,
                "role": result.membership.role,
                "api_key": api_key_out(result.issued.api_key, value=result.issued.value),
            },
            status=status.HTTP_201_CREATED,
        )


class InvitationAcceptApi(APIView):
    """Accept an invitation with its emailed token; returns a first API key for the new member."""

    authentication_classes: list[Any] = []
    permission_classes = [AllowAny]
    throttle_classes = [ScopedRateThrottle]
    throttle_scope = "invite_accept"

    class InputSerializer(StrictInputSerializer):
        class Meta:
            ref_name = "InvitationAcceptRequest"

        token = serializers.CharField(max_length=200)
        password = serializers.CharField(max_length=256, trim_whitespace=False)

    @extend_schema(request=InputSerializer, responses={201: dict}, auth=[])
    def post(self, request: Request) -> Response:
        data = validated(self.InputSerializer, request.data)
        membership, issued = services.invitation_accept(
            token=data["token"], password=data["password"], actor=Actor.from_request(request)
        )
        return Response(
            {
                "object": "organization.member",
                "member": member_out(membership),
                "organization": organization_out(membership.organization),
                "api_key": api_key_out(issued.api_key, value=issued.value),
            },
            status=201,
        )


class MeApi(PrincipalApi):
    """Who the key is: its organization, member, role and effective scopes."""

    scopes = {"read": None}

    @extend_schema(responses={200: dict})
    def get(self, request: Request) -> Response:
        p = self.principal
        return Response(
            {
                "object": "me",
                "api_key_id": p.api_key.pk,
                "organization": {"id": p.organization.pk, "name": p.organization.name},
                "member_id": p.membership.pk if p.membership else None,
                "user": {"id": p.user.pk, "email": p.user.email} if p.user else None,
                "role": p.role,
                "scopes": sorted(p.scopes),
            }
        )


class ApiKeyListCreateApi(PrincipalApi):
    scopes = {"read": "organization.read", "write": "organization.write"}

    class InputSerializer(StrictInputSerializer):
        class Meta:
            ref_name = "ApiKeyListCreateRequest"

        name = serializers.CharField(max_length=100)
        scopes = serializers.ListField(
            child=serializers.CharField(max_length=64),
            required=False,
            default=["all"],
            max_length=32,
        )
        expires_at = serializers.DateTimeField(required=False, allow_null=True, default=None)
        member_id = serializers.CharField(max_length=40, required=False, allow_null=True)
        service_account = serializers.BooleanField(required=False, default=False)

    @extend_schema(responses={200: dict}, operation_id="list_api_keys")
    def get(self, request: Request) -> Response:
        queryset = APIKey.objects.for_organization(self.organization)
        if "status" in request.query_params:
            queryset = api_keys_with_status(queryset, request.query_params["status"])
        rows, has_more = paginate(queryset, request)
        return list_response(rows, has_more, api_key_out)

    @extend_schema(request=InputSerializer, responses={201: dict})
    def post(self, request: Request) -> Response:
        data = validated(self.InputSerializer, request.data)
        member = self._member_for_new_key(data)
        issued = services.api_key_create(
            principal=self.principal,
            name=data["name"],
            scopes=data["scopes"],
            member=member,
            expires_at=data["expires_at"],
            actor=Actor.from_request(request),
        )
        return Response(api_key_out(issued.api_key, value=issued.value), status=201)

    def _member_for_new_key(self, data: dict[str, Any]) -> Membership | None:
        if data["service_account"]:
            if data.get("member_id"):
                raise ApiError(
                    "Give either 'service_account' or 'member_id', not both.", param="member_id"
                )
            self._require_manager("create service-account keys")
            return None
        member_id = data.get("member_id")
        own = self.principal.membership
        if not member_id:
            if own is None:
                raise ApiError(
                    "This service key has no member: give 'member_id' or 'service_account': true.",
                    param="member_id",
                )
            return own
        if own is None or member_id != own.pk:
            self._require_manager("create keys for other members")
        return self.get_owned(Membership, member_id, label="member")

    def _require_manager(self, what: str) -> None:
        role = self.principal.role
        if role is not None and role not in MANAGERS:
            raise ApiError(
                f"Only owners and admins can {what}.", status_code=403, code="insufficient_role"
            )


class ApiKeyDetailApi(PrincipalApi):
    scopes = {"read": "organization.read", "write": "organization.write"}

    class InputSerializer(StrictInputSerializer):
        class Meta:
            ref_name = "ApiKeyDetailRequest"

        name = serializers.CharField(max_length=100)

    @extend_schema(responses={200: dict})
    def get(self, request: Request, key_id: str) -> Response:
        return Response(api_key_out(self.get_owned(APIKey, key_id, label="API key")))

    @extend_schema(request=InputSerializer, responses={200: dict})
    def patch(self, request: Request, key_id: str) -> Response:
        api_key = self.get_owned(APIKey, key_id, label="API key")
        data = validated(self.InputSerializer, request.data)
        api_key = services.api_key_rename(
            api_key=api_key,
            name=data["name"],
            principal=self.principal,
            actor=Actor.from_request(request),
        )
        return Response(api_key_out(api_key))

    @extend_schema(responses={200: dict})
    def delete(self, request: Request, key_id: str) -> Response:
        api_key = self.get_owned(APIKey, key_id, label="API key")
        services.api_key_revoke(
            api_key=api_key, principal=self.principal, actor=Actor.from_request(request)
        )
        return Response(
            {"object": "organization.api_key.deleted", "id": api_key.pk, "deleted": True}
        )


class ApiKeyRotateApi(PrincipalApi):
    scopes = {"write": "organization.write"}

    class InputSerializer(StrictInputSerializer):
        class Meta:
            ref_name = "ApiKeyRotateRequest"

        grace_period_seconds = serializers.IntegerField(required=False, min_value=0)

    @extend_schema(
        request=InputSerializer,
        responses={201: inline_serializer("RotatedKey", {"value": serializers.CharField()})},
    )
    def post(self, request: Request, key_id: str) -> Response:
        api_key = self.get_owned(APIKey, key_id, label="API key")
        data = validated(self.InputSerializer, request.data or {})
        grace = data.get("grace_period_seconds")
        maximum = settings.API_KEY_ROTATION_MAX_GRACE_SECONDS
        if grace is not None and grace > maximum:
            raise ApiError(
                f"'grace_period_seconds' can be at most {maximum}.", param="grace_period_seconds"
            )
        issued = services.api_key_rotate(
            api_key=api_key,
            grace_period_seconds=grace,
            principal=self.principal,
            actor=Actor.from_request(request),
        )
        return Response(api_key_out(issued.api_key, value=issued.value), status=201)
