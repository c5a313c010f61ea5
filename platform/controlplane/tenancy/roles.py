"""Member roles, and what each role may do at most (its scope ceiling)."""

from __future__ import annotations

from django.db import models


class Role(models.TextChoices):
    OWNER = "owner", "Owner"
    ADMIN = "admin", "Admin"
    DEVELOPER = "developer", "Developer"
    BILLING = "billing", "Billing"
    VIEWER = "viewer", "Viewer"


#: Roles that manage members, keys and the organization itself.
MANAGERS = frozenset({Role.OWNER, Role.ADMIN})


def can_manage_role(actor: str | None, target: str) -> bool:
    """Whether someone of role `actor` may grant, change or remove role `target`.

    `actor` None is a service key (no member) holding `organization.write`: it
    acts like an admin. Only owners touch owners.
    """
    if actor == Role.OWNER:
        return True
    if actor in (Role.ADMIN, None):
        return target != Role.OWNER
    return False
