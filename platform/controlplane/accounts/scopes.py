"""API key scopes, and how a key's scopes meet its member's role.

A key's effective scopes are its own scopes, expanded, intersected with the
ceiling of its member's role (a key bound to a member can never do more than
that member). A service key (no member) is bounded by its own scopes only.
"""

from __future__ import annotations

from collections.abc import Iterable

from controlplane.tenancy.roles import Role

RESOURCES = ("models", "files", "fine_tuning", "billing", "organization")

#: Every concrete scope a view can require.
CONCRETE = frozenset(
    {f"{r}.{a}" for r in RESOURCES for a in ("read", "write")} | {"inference", "audit_logs.read"}
)

#: Names a caller may put on a key, and what each grants.
ALIASES: dict[str, frozenset[str]] = {
    "all": CONCRETE,
    "read_only": frozenset(s for s in CONCRETE if s.endswith(".read")),
    "admin": frozenset({"organization.read", "organization.write", "audit_logs.read"}),
}
for _r in RESOURCES:
    # Write implies read on the same resource.
    ALIASES[f"{_r}.write"] = frozenset({f"{_r}.read", f"{_r}.write"})

GRANTABLE = frozenset(CONCRETE | ALIASES.keys())

_BUILDING = frozenset(
    {
        "models.read",
        "models.write",
        "files.read",
        "files.write",
        "fine_tuning.read",
        "fine_tuning.write",
        "inference",
        "organization.read",
    }
)

#: The most a member of each role can do, whatever their key says.
ROLE_CEILING: dict[str, frozenset[str]] = {
    Role.OWNER: CONCRETE,
    Role.ADMIN: CONCRETE,
    Role.DEVELOPER: _BUILDING,
    Role.BILLING: frozenset({"billing.read", "billing.write", "models.read", "organization.read"}),
    Role.VIEWER: frozenset({"models.read", "files.read", "fine_tuning.read", "organization.read"}),
}


def expand(scopes: Iterable[str]) -> frozenset[str]:
    out: set[str] = set()
    for scope in scopes:
        out |= ALIASES.get(scope, frozenset({scope}) if scope in CONCRETE else frozenset())
    return frozenset(out)


def effective(scopes: Iterable[str], role: str | None) -> frozenset[str]:
    granted = expand(scopes)
    return granted if role is None else granted & ROLE_CEILING[role]
