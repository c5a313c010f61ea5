"""The organization, its members (`/v1/organization/members`), invitations and audit log.

Accepting an invitation makes an account and its first key: accounts serves it.
"""

from __future__ import annotations

from drf_spectacular.utils import extend_schema
from rest_framework import serializers
from rest_framework.request import Request
from rest_framework.response import Response

from controlplane.audit.models import AuditLog
from controlplane.audit.serializers import audit_log_out
from controlplane.audit.services import Actor
from controlplane.core.pagination import list_response, paginate
from controlplane.core.serializers import StrictInputSerializer, validated

from . import services
from .apis_base import OrganizationApi
from .models import ORGANIZATION_KINDS, Invitation, Membership
from .roles import Role
from .serializers import invitation_out, member_out, organization_out


class OrganizationDetailApi(OrganizationApi):
    scopes = {"read": "organization.read", "write": "organization.write"}

    class InputSerializer(StrictInputSerializer):
        class Meta:
            ref_name = "OrganizationDetailRequest"

        name = serializers.CharField(max_length=200, required=False)
        kinds = serializers.ListField(
            child=serializers.ChoiceField(choices=ORGANIZATION_KINDS), required=False, min_length=1
        )

    @extend_schema(responses={200: dict})
    def get(self, request: Request) -> Response:
        return Response(organization_out(self.organization))

    @extend_schema(request=InputSerializer, responses={200: dict})
    def patch(self, request: Request) -> Response:
        data = validated(self.InputSerializer, request.data)
        organization = services.organization_update(
            organization=self.organization,
            name=data.get("name"),
            kinds=data.get("kinds"),
            actor=Actor.from_request(request),
        )
        return Response(organization_out(organization))


class MemberListInviteApi(OrganizationApi):
    """GET lists members; POST invites someone by email (they accept with the emailed token)."""

    scopes = {"read": "organization.read", "write": "organization.write"}

    class InputSerializer(StrictInputSerializer):
        class Meta:
            ref_name = "MemberListInviteRequest"

        email = serializers.EmailField(max_length=254)
        role = serializers.ChoiceField(choices=Role.choices, default=Role.DEVELOPER)

    @extend_schema(responses={200: dict}, operation_id="list_members")
    def get(self, request: Request) -> Response:
        rows, has_more = paginate(
            Membership.objects.for_organization(self.organization).select_related("user"), request
        )
        return list_response(rows, has_more, member_out)

    @extend_schema(request=InputSerializer, responses={201: dict})
    def post(self, request: Request) -> Response:
        data = validated(self.InputSerializer, request.data)
        new = services.invitation_create(
            organization=self.organization,
            email=data["email"],
            role=data["role"],
            actor_role=self.principal.role,
            invited_by_id=self.principal.user.pk if self.principal.user else None,
            actor=Actor.from_request(request),
        )
        return Response(invitation_out(new.invitation), status=201)


class MemberDetailApi(OrganizationApi):
    scopes = {"read": "organization.read", "write": "organization.write"}

    class InputSerializer(StrictInputSerializer):
        class Meta:
            ref_name = "MemberDetailRequest"

        role = serializers.ChoiceField(choices=Role.choices)

    def _member(self, member_id: str) -> Membership:
        return self.get_owned(Membership, member_id, label="member")

    @extend_schema(responses={200: dict})
    def get(self, request: Request, member_id: str) -> Response:
        return Response(member_out(self._member(member_id)))

    @extend_schema(request=InputSerializer, responses={200: dict})
    def patch(self, request: Request, member_id: str) -> Response:
        member = self._member(member_id)
        data = validated(self.InputSerializer, request.data)
        member = services.membership_change_role(
            member=member,
            role=data["role"],
            actor_role=self.principal.role,
            actor=Actor.from_request(request),
        )
        return Response(member_out(member))

    @extend_schema(responses={200: dict})
    def delete(self, request: Request, member_id: str) -> Response:
        member = self._member(member_id)
        services.membership_remove(
            member=member, actor_role=self.principal.role, actor=Actor.from_request(request)
        )
        return Response({"object": "organization.member.deleted", "id": member_id, "deleted": True})


class InviteListApi(OrganizationApi):
    scopes = {"read": "organization.read"}

    @extend_schema(responses={200: dict}, operation_id="list_invites")
    def get(self, request: Request) -> Response:
        rows, has_more = paginate(Invitation.objects.for_organization(self.organization), request)
        return list_response(rows, has_more, invitation_out)


class InviteDetailApi(OrganizationApi):
    scopes = {"read": "organization.read", "write": "organization.write"}

    @extend_schema(responses={200: dict})
    def get(self, request: Request, invite_id: str) -> Response:
        return Response(invitation_out(self.get_owned(Invitation, invite_id, label="invitation")))

    @extend_schema(responses={200: dict})
    def delete(self, request: Request, invite_id: str) -> Response:
        invitation = self.get_owned(Invitation, invite_id, label="invitation")
        services.invitation_revoke(invitation=invitation, actor=Actor.from_request(request))
        return Response({"object": "organization.invite.deleted", "id": invite_id, "deleted": True})


#: Query parameters that filter the audit log, and the field each filters.
_AUDIT_FILTERS = {"action": "action", "actor_id": "actor_id", "target_id": "target_id"}


class AuditLogListApi(OrganizationApi):
    """`/v1/organization/audit_logs`: who changed access, what, when and from where."""

    scopes = {"read": "audit_logs.read"}

    @extend_schema(responses={200: dict})
    def get(self, request: Request) -> Response:
        # Staff's work on a custom engagement is the platform's record (it names staff);
        # the customer follows it at /v1/engagements.
        queryset = AuditLog.objects.for_organization(self.organization).exclude(
            action__startswith="engagement."
        )
        for param, field in _AUDIT_FILTERS.items():
            value = request.query_params.get(param)
            if value:
                queryset = queryset.filter(**{field: value})
        rows, has_more = paginate(queryset, request)
        return list_response(rows, has_more, audit_log_out)
