"""Public ids: `<prefix>_<26 chars>`, time-ordered like a ULID.

48 bits of milliseconds then 80 random bits, in Crockford base32, lower-case.
Sorting ids sorts by creation time (strictly, within one process), which makes
cursor pagination on `id` match `created_at` order without a second column.
"""

from __future__ import annotations

import secrets
import threading
import time

_ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"


def _encode(value: int, length: int) -> str:
    chars = []
    for _ in range(length):
        value, rem = divmod(value, 32)
        chars.append(_ALPHABET[rem])
    return "".join(reversed(chars))


_lock = threading.Lock()
_last = 0


def new_id(prefix: str) -> str:
    """A fresh id; within one process, ids sort in the order they were made.

    ULID's monotonic rule: an id made in the same millisecond as the one before
    (or while the clock stepped back) is the previous value plus one, so rows
    created in a burst still list in creation order.
    """
    global _last
    millis = time.time_ns() // 1_000_000
    with _lock:
        value = (millis << 80) | secrets.randbits(80)
        if value <= _last:
            value = _last + 1
        _last = value
    return f"{prefix}_{_encode(value, 26)}"


# Migrations serialise defaults by import path, so each prefix has a named function.
def new_org_id() -> str:
    return new_id("org")


def new_user_id() -> str:
    return new_id("user")


def new_member_id() -> str:
    return new_id("mem")


def new_key_id() -> str:
    return new_id("key")


def new_invite_id() -> str:
    return new_id("invite")


def new_audit_id() -> str:
    return new_id("audit")


def new_file_id() -> str:
    # OpenAI's files are `file-…`: the official SDKs and tools match on it.
    return new_id("file").replace("file_", "file-", 1)


def new_upload_id() -> str:
    return new_id("upload")


def new_part_id() -> str:
    return new_id("part")


def new_dataset_id() -> str:
    return new_id("ds")


def new_dataset_version_id() -> str:
    return new_id("dsv")


def new_listing_id() -> str:
    return new_id("lst")


def new_access_id() -> str:
    return new_id("acc")


def new_usage_id() -> str:
    return new_id("use")


def new_deployment_id() -> str:
    return new_id("dep")


def new_inference_usage_id() -> str:
    # `use_` is taken by data partners' usage (datasets.PartnerUsage).
    return new_id("usage")


def new_job_id() -> str:
    # OpenAI's fine-tuning jobs are `ftjob-…`, events `ftevent-…`, checkpoints `ftckpt-…`.
    return new_id("ftjob").replace("ftjob_", "ftjob-", 1)


def new_compression_job_id() -> str:
    return new_id("cmpjob").replace("cmpjob_", "cmpjob-", 1)


def new_job_event_id() -> str:
    return new_id("ftevent").replace("ftevent_", "ftevent-", 1)


def new_checkpoint_id() -> str:
    return new_id("ftckpt").replace("ftckpt_", "ftckpt-", 1)


def new_engagement_id() -> str:
    return new_id("eng")


def new_milestone_id() -> str:
    return new_id("ms")


def new_engagement_event_id() -> str:
    return new_id("engevt")
