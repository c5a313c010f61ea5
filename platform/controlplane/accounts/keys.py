"""API key format and hashing.

A key reads `atl_live_<prefix 8>_<secret 40><checksum 6>`, base62 throughout:

- the fixed `atl_live_` start lets secret scanners (GitHub, GitLab, TruffleHog)
  match it with one pattern, and the CRC32 checksum lets them tell a real key
  from a random string without calling us (the scheme GitHub's tokens use);
- the prefix is public: it is the lookup key, shown in listings and logs;
- only a SHA-512 of the whole key is stored. Keys have ~238 bits of entropy, so a
  fast hash is safe, and a slow password hasher would cost milliseconds on every
  request. Hashing and the constant-time compare come from
  djangorestframework-api-key's `KeyGenerator` (its model does not fit: see
  accounts/models.py).
"""

from __future__ import annotations

import re
import secrets
import zlib
from dataclasses import dataclass

from rest_framework_api_key.crypto import KeyGenerator

KEY_START = "atl_live_"
PREFIX_LENGTH = 8
SECRET_LENGTH = 40
CHECKSUM_LENGTH = 6
_BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_PATTERN = re.compile(
    rf"^{KEY_START}(?P<prefix>[0-9A-Za-z]{{{PREFIX_LENGTH}}})_"
    rf"(?P<secret>[0-9A-Za-z]{{{SECRET_LENGTH}}})(?P<checksum>[0-9A-Za-z]{{{CHECKSUM_LENGTH}}})$"
)
_generator = KeyGenerator()


def _random_base62(length: int) -> str:
    return "".join(secrets.choice(_BASE62) for _ in range(length))


def _base62(value: int, length: int) -> str:
    chars = []
    for _ in range(length):
        value, rem = divmod(value, 62)
        chars.append(_BASE62[rem])
    return "".join(reversed(chars))


def checksum(body: str) -> str:
    return _base62(zlib.crc32(body.encode()), CHECKSUM_LENGTH)


@dataclass(frozen=True)
class NewKey:
    key: str
    prefix: str
    hashed: str

    @property
    def last_four(self) -> str:
        return self.key[-4:]


def generate() -> NewKey:
    prefix = _random_base62(PREFIX_LENGTH)
    body = f"{KEY_START}{prefix}_{_random_base62(SECRET_LENGTH)}"
    key = body + checksum(body)
    return NewKey(key=key, prefix=prefix, hashed=_generator.hash(key))


def parse_prefix(key: str) -> str | None:
    """The key's public prefix, or None when it is not a well-formed Atelier key."""
    match = _PATTERN.match(key)
    if match is None:
        return None
    body = key[:-CHECKSUM_LENGTH]
    if not secrets.compare_digest(checksum(body), match["checksum"]):
        return None
    return match["prefix"]


def verify(key: str, hashed: str) -> bool:
    return _generator.verify(key, hashed)
