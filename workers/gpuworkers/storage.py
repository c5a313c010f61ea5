"""Object storage by URI, for the GPU workers: `file:///abs/path` and `s3://bucket/key`.

A "directory" is a key prefix: `s3://bucket/jobs/ft-1/final` names every object
under `jobs/ft-1/final/`. S3's endpoint comes from `AWS_S3_ENDPOINT_URL` (MinIO,
moto, …) and credentials from the standard AWS environment, never from a message.
Everything streams: no whole object is held in memory except `read_bytes`, which
is for small objects (signals, small JSON).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any
from urllib.parse import unquote, urlsplit

SCHEMES = ("file", "s3")
CHUNK_BYTES = 1 << 20


class StorageError(Exception):
    """A URI this module cannot use (unknown scheme, relative path, empty bucket)."""


@dataclass(frozen=True)
class Location:
    scheme: str
    bucket: str  # empty for file://
    key: str  # absolute path for file://, object key for s3://

    @property
    def path(self) -> Path:
        return Path(self.key)


def parse(uri: str) -> Location:
    parts = urlsplit(uri)
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise StorageError(f"file URIs name no host: {uri!r}")
        path = unquote(parts.path)
        if not path.startswith("/"):
            raise StorageError(f"file URIs need an absolute path: {uri!r}")
        return Location("file", "", path)
    if parts.scheme == "s3":
        if not parts.netloc:
            raise StorageError(f"s3 URIs name a bucket: {uri!r}")
        return Location("s3", parts.netloc, unquote(parts.path).lstrip("/"))
    raise StorageError(f"unsupported storage URI {uri!r}: use one of {', '.join(SCHEMES)}")


def join(uri: str, *names: str) -> str:
    """`join("s3://b/out", "final", "x.json")` → `s3://b/out/final/x.json`."""
    parts = [uri.rstrip("/"), *(name.strip("/") for name in names)]
    return "/".join(parts)


_clients: dict[tuple[str | None, str | None, str | None], Any] = {}
_clients_lock = threading.Lock()


def _s3() -> Any:
    # boto3 clients are thread-safe; one per endpoint/credentials, so a test (or
    # a rotated credential in the environment) gets a fresh one.
    key = (
        os.environ.get("AWS_S3_ENDPOINT_URL") or None,
        os.environ.get("AWS_ACCESS_KEY_ID"),
        os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION"),
    )
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            import boto3

            client = boto3.client("s3", endpoint_url=key[0])
            _clients[key] = client
        return client


def _missing(error: Exception) -> bool:
    response = getattr(error, "response", None)
    if not isinstance(response, dict):
        return False
    code = str(response.get("Error", {}).get("Code", ""))
    return code in ("404", "NoSuchKey", "NotFound")


@contextlib.contextmanager
def open_read(uri: str) -> Iterator[IO[bytes]]:
    """A binary stream of the object; FileNotFoundError when it does not exist."""
    loc = parse(uri)
    if loc.scheme == "file":
        with loc.path.open("rb") as stream:
            yield stream
        return
    from botocore.exceptions import ClientError

    try:
        body = _s3().get_object(Bucket=loc.bucket, Key=loc.key)["Body"]
    except ClientError as error:
        if _missing(error):
            raise FileNotFoundError(uri) from error
        raise
    try:
        yield body
    finally:
        body.close()


def read_bytes(uri: str) -> bytes | None:
    """A small object's content, or None when it does not exist."""
    try:
        with open_read(uri) as stream:
            return stream.read()
    except FileNotFoundError:
        return None


def write_bytes(uri: str, data: bytes) -> None:
    """Write an object whole; readers never see a half-written file."""
    loc = parse(uri)
    if loc.scheme == "file":
        loc.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=loc.path.parent, prefix=f".{loc.path.name}.")
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(data)
            os.replace(tmp, loc.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return
    _s3().put_object(Bucket=loc.bucket, Key=loc.key, Body=data)


def download_file(uri: str, local: Path) -> Path:
    """Stream one object to a local file (created with its parents)."""
    local.parent.mkdir(parents=True, exist_ok=True)
    loc = parse(uri)
    if loc.scheme == "s3":
        from botocore.exceptions import ClientError

        try:
            _s3().download_file(loc.bucket, loc.key, str(local))
        except ClientError as error:
            if _missing(error):
                raise FileNotFoundError(uri) from error
            raise
        return local
    with open_read(uri) as stream, local.open("wb") as out:
        shutil.copyfileobj(stream, out, CHUNK_BYTES)
    return local


def upload_file(local: Path, uri: str) -> None:
    loc = parse(uri)
    if loc.scheme == "file":
        loc.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = loc.path.with_name(f".{loc.path.name}.partial")
        shutil.copyfile(local, tmp)
        os.replace(tmp, loc.path)
        return
    _s3().upload_file(str(local), loc.bucket, loc.key)


def list_names(prefix_uri: str) -> list[str]:
    """Names (relative, `/`-separated) of every object under a "directory" URI, sorted."""
    loc = parse(prefix_uri)
    if loc.scheme == "file":
        root = loc.path
        if not root.is_dir():
            return []
        return sorted(
            path.relative_to(root).as_posix()
            for path in root.rglob("*")
            if path.is_file() and not path.name.endswith(".partial")
        )
    prefix = loc.key.rstrip("/") + "/" if loc.key else ""
    names: list[str] = []
    paginator = _s3().get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=loc.bucket, Prefix=prefix):
        for item in page.get("Contents", ()):
            names.append(str(item["Key"])[len(prefix) :])
    return sorted(name for name in names if name)


def download_dir(prefix_uri: str, local: Path) -> list[str]:
    """Copy every object under a "directory" URI into `local`; returns the names.

    FileNotFoundError when nothing is there: an empty prefix is a missing directory.
    """
    names = list_names(prefix_uri)
    if not names:
        raise FileNotFoundError(prefix_uri)
    for name in names:
        target = local / name
        if not target.resolve().is_relative_to(local.resolve()):
            raise StorageError(f"object name escapes the target directory: {name!r}")
        download_file(join(prefix_uri, name), target)
    return names


def upload_dir(local: Path, prefix_uri: str, *, last: tuple[str, ...] = ()) -> list[str]:
    """Copy every file under `local` to the "directory" URI; returns the names.

    Files named in `last` are uploaded after all the others, so a reader that
    waits for them (a checkpoint's `trainer_state.json`) sees a complete directory.
    """
    names = sorted(
        path.relative_to(local).as_posix() for path in local.rglob("*") if path.is_file()
    )
    ordered = [name for name in names if name not in last] + [n for n in last if n in names]
    for name in ordered:
        upload_file(local / name, join(prefix_uri, name))
    return names


def local_path(uri: str) -> Path | None:
    """The filesystem path of a `file://` URI (usable in place), else None."""
    loc = parse(uri)
    return loc.path if loc.scheme == "file" else None
