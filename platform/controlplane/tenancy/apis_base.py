"""The one base class every tenant endpoint derives from.

It authenticates the key, checks the scope the method needs, and hands the view
`self.organization`. Objects are fetched only through `get_owned()`, which
scopes by that organization: a foreign id is a 404, indistinguishable from an id
that does not exist.

The caller is whatever key authentication (accounts, `ApiKeyAuthentication`) put on
`request.user`; this base needs only the `Caller` it describes. Endpoints that need the
key itself derive from accounts' `PrincipalApi`.
"""

from __future__ import annotations

from typing import Any, ClassVar, Protocol, TypeVar, cast

from django.contrib.auth.base_user import AbstractBaseUser
from rest_framework.permissions import BasePermission, IsAuthenticated
from rest_framework.request import Request
from rest_framework.views import APIView

from controlplane.core.errors import MissingScope, NotFound
from controlplane.core.scoping import OrganizationOwned
from controlplane.tenancy.models import Membership, Organization

M = TypeVar("M", bound=OrganizationOwned)


class Caller(Protocol):
    """Who calls a tenant endpoint: accounts' `Principal` is one (tenancy sits below
    accounts and never imports it)."""

    @property
    def organization(self) -> Organization: ...
    @property
    def membership(self) -> Membership | None: ...
    @property
    def user(self) -> AbstractBaseUser | None: ...
    @property
    def role(self) -> str | None: ...
    @property
    def scopes(self) -> frozenset[str]: ...
    @property
    def pk(self) -> str: ...


_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def scope_require(caller: Caller, needed: str | None, *, method: str, path: str) -> None:
    """Refuse (403 `missing_scope`) a caller without the scope `method path` needs (None:
    none needed). The one scope check: every DRF endpoint's and the serving router's."""
    if needed is None or needed in caller.scopes:
        return
    bound = (
        f" A key can do no more than its member's role ('{caller.role}') allows."
        if caller.role
        else ""
    )
    raise MissingScope(
        f"This API key lacks the '{needed}' scope needed for "
        f"{method} {path}.{bound} Use a key that has that scope.",
        code="missing_scope",
    )


class HasRequiredScope(BasePermission):
    def has_permission(self, request: Request, view: Any) -> bool:
        principal: Caller = request.user  # type: ignore[assignment]
        method = request.method or "GET"
        scope_require(principal, view.required_scope(method), method=method, path=request.path)
        return True


class OrganizationApi(APIView):
    """Base of every endpoint that acts within the caller's organization.

    Subclasses name the scope a method needs in `scopes` (e.g.
    `{"read": "organization.read", "write": "organization.write"}`); `read`
    covers GET/HEAD/OPTIONS and `write` every other method.
    """

    permission_classes = [IsAuthenticated, HasRequiredScope]
    scopes: ClassVar[dict[str, str | None]] = {}

    def required_scope(self, method: str) -> str | None:
        kind = "read" if method in _SAFE_METHODS else "write"
        if kind not in self.scopes:
            raise AssertionError(f"{type(self).__name__} names no '{kind}' scope")
        return self.scopes[kind]

    @property
    def principal(self) -> Caller:
        return self.request.user  # type: ignore[return-value]

    @property
    def organization(self) -> Organization:
        return self.principal.organization

    def get_owned(
        self, model: type[M], pk: str, *, label: str | None = None, **conditions: Any
    ) -> M:
        """The caller's object with this id (and `conditions`), or the one 404 for all misses."""
        try:
            if "\x00" in pk:  # PostgreSQL refuses NUL in text: no id holds one
                raise ValueError(pk)
            return cast(
                M, model.objects.for_organization(self.organization).get(pk=pk, **conditions)
            )
        except (model.DoesNotExist, ValueError):
            name = label or model._meta.verbose_name
            raise NotFound(f"No {name} with id '{pk}' found.", param="id") from None
