"""Request ids: accept a caller's `x-request-id` if it is sane, else make one."""

from __future__ import annotations

import re
import uuid

HEADER = "x-request-id"
_SAFE = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


def request_id_from(value: str | bytes | None) -> str:
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    if value and _SAFE.match(value):
        return value
    return f"req_{uuid.uuid4().hex}"
