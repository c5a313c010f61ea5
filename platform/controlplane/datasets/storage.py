"""Streaming reads and writes of stored objects, with sizes and SHA-256 computed on the way.

Nothing here holds a whole file: objects are written from a reader in chunks
(Django's storage API), and read back the same way. Works with the local
filesystem and with S3 (django-storages) alike.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, BinaryIO, cast

from django.core.files import File as DjangoFile
from django.core.files.storage import default_storage

CHUNK = 1024 * 1024


class HashingReader(io.RawIOBase):
    """Reads through `source`, counting bytes and hashing them."""

    def __init__(self, source: IO[bytes] | io.RawIOBase, *, limit: int | None = None) -> None:
        self.source = source
        self.size = 0
        self.limit = limit
        self.sha256 = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        data = self.source.read(len(buffer))
        n = len(data)
        buffer[:n] = data
        self.size += n
        if self.limit is not None and self.size > self.limit:
            raise ObjectTooLarge(self.limit)
        self.sha256.update(data)
        return n


class ObjectTooLarge(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__(f"more than {limit} bytes")
        self.limit = limit


class ConcatReader(io.RawIOBase):
    """One stream over several stored objects, opened one at a time."""

    def __init__(self, names: Iterable[str], *, line_separated: bool = False) -> None:
        self._names: Iterator[str] = iter(names)
        self._current: IO[bytes] | None = None
        # Line-oriented sources: make sure one object's last line never runs into the next.
        self._line_separated = line_separated
        self._last = b"\n"
        # OpenAI's uploads API verifies an md5 on completion; we verify sha256 too.
        self.md5 = hashlib.md5(usedforsecurity=False)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        while True:
            if self._current is None:
                name = next(self._names, None)
                if name is None:
                    return 0
                self._current = default_storage.open(name, "rb")
            data = self._current.read(len(buffer))
            if data:
                buffer[: len(data)] = data
                self.md5.update(data)
                self._last = data[-1:]
                return len(data)
            self._current.close()
            self._current = None
            if self._line_separated and self._last != b"\n":
                self._last = b"\n"
                buffer[:1] = b"\n"
                self.md5.update(b"\n")
                return 1

    def close(self) -> None:
        if self._current is not None:
            self._current.close()
        super().close()


def save_stream(
    name: str, source: IO[bytes] | io.RawIOBase, *, limit: int | None = None
) -> tuple[str, int, str]:
    """Store `source` under `name`; returns (stored name, bytes, sha256 hex)."""
    reader = HashingReader(source, limit=limit)
    buffered = io.BufferedReader(reader, buffer_size=CHUNK)
    try:
        stored = default_storage.save(name, DjangoFile(buffered, name=name))
    except ObjectTooLarge:
        delete_quietly(name)
        raise
    return stored, reader.size, reader.sha256.hexdigest()


def object_uri(name: str) -> str:
    """The URI a GPU worker reaches a stored object by: `s3://bucket/key` or `file:///path`.

    Workers have no Django: they get URIs in their job spec and resolve them with
    their own storage credentials (see jobcontracts.training).
    """
    bucket = getattr(default_storage, "bucket_name", None)
    if bucket:
        location = str(getattr(default_storage, "location", "") or "").strip("/")
        key = f"{location}/{name}" if location else name
        return f"s3://{bucket}/{key}"
    return Path(default_storage.path(name)).as_uri()


def open_object(name: str) -> BinaryIO:
    return cast(BinaryIO, default_storage.open(name, "rb"))


def delete(name: str) -> None:
    """Remove an object; one already gone is fine, any other failure is raised."""
    default_storage.delete(name)


def delete_quietly(name: str) -> None:
    """Remove an object that may or may not exist (cleanup after a failure)."""
    # Best effort: the failure being cleaned up after is the one worth reporting.
    with contextlib.suppress(Exception):
        default_storage.delete(name)
