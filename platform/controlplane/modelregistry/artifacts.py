"""Model directories on disk and in object storage: checks, copies, reads and deletes by URI.

Model weights are loaded by GPU workers with `from_pretrained(path)`. A pickle
(`*.bin`, `*.pt`, …) runs code when it is loaded, so a directory holding one is
refused outright: the platform only ever handles safetensors. Everything here
streams; nothing holds a whole weight file in memory.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import struct
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, BinaryIO, Final, cast
from urllib.parse import unquote, urlparse

import structlog
from django.conf import settings
from django.core.files.storage import default_storage

from controlplane.datasets import storage

log = structlog.get_logger(__name__)

#: Suffixes of pickle-based weight and state files (torch.save, joblib, Lightning).
PICKLE_SUFFIXES: Final = (".bin", ".pt", ".pth", ".pkl", ".ckpt", ".pickle")

#: Config keys holding the longest sequence a model takes, most specific first.
_CONTEXT_KEYS: Final = ("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len")

_CONVERT_HINT: Final = (
    "Convert it to safetensors first, e.g. load it once in a trusted environment and "
    "save it with `model.save_pretrained(out, safe_serialization=True)` and "
    "`tokenizer.save_pretrained(out)`."
)


class ModelDirError(ValueError):
    """A directory that is not an importable model, with what to change."""


@dataclass(frozen=True)
class ModelDir:
    """A checked Hugging Face-format model directory."""

    path: Path
    #: Regular files to copy, relative to `path` (hidden files and folders left out).
    files: tuple[Path, ...]
    config: dict[str, Any]

    @property
    def family(self) -> str | None:
        model_type = self.config.get("model_type")
        return model_type if isinstance(model_type, str) and model_type else None

    @property
    def context_length(self) -> int | None:
        for key in _CONTEXT_KEYS:
            value = self.config.get(key)
            if type(value) is int and value > 0:
                return value
        return None


def inspect_model_dir(path: Path) -> ModelDir:
    """Check that `path` is a safetensors-only model directory and read its config.json.

    Refuses (ModelDirError) a missing directory, any pickle file anywhere under
    it, and a directory without config.json, `*.safetensors` or tokenizer.json
    (the control plane counts tokens with it before any job runs).
    """
    if not path.is_dir():
        raise ModelDirError(f"{path} is not a directory.")
    everything: list[Path] = []
    for folder, dirs, names in os.walk(path):
        dirs.sort()
        for name in sorted(names):
            full = Path(folder) / name
            if full.is_file():
                everything.append(full.relative_to(path))
    pickles = [p for p in everything if p.suffix.lower() in PICKLE_SUFFIXES]
    if pickles:
        listed = ", ".join(p.as_posix() for p in pickles[:5])
        raise ModelDirError(
            f"{path} holds pickle files ({listed}). Pickles run code when loaded, so "
            f"Atelier accepts safetensors only. {_CONVERT_HINT} Then remove the pickle files."
        )
    visible = tuple(p for p in everything if not any(part.startswith(".") for part in p.parts))
    present = {p.as_posix() for p in visible}
    if not any(p.suffix == ".safetensors" for p in visible):
        raise ModelDirError(f"{path} has no *.safetensors weights. {_CONVERT_HINT}")
    if "config.json" not in present:
        raise ModelDirError(
            f"{path} has no config.json: save the model with `save_pretrained` so it has one."
        )
    if "tokenizer.json" not in present:
        raise ModelDirError(
            f"{path} has no tokenizer.json (a fast tokenizer): save one with "
            "`AutoTokenizer.from_pretrained(path).save_pretrained(path)`."
        )
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelDirError(f"{path}/config.json is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise ModelDirError(f"{path}/config.json must hold a JSON object.")
    return ModelDir(path=path, files=visible, config=config)


def copy_to_storage(model_dir: ModelDir, prefix: str) -> list[str]:
    """Copy the directory's files under `prefix` in default storage, streaming; the stored names.

    Objects already at those names are replaced. On any failure what was copied
    is removed again.
    """
    stored: list[str] = []
    try:
        for relative in model_dir.files:
            name = f"{prefix}/{relative.as_posix()}"
            if default_storage.exists(name):
                default_storage.delete(name)
            with (model_dir.path / relative).open("rb") as source:
                saved, _, _ = storage.save_stream(name, source)
            stored.append(saved)
            if saved != name:  # the storage renamed it: a concurrent writer
                raise ModelDirError(f"Could not store {name} (stored as {saved}); retry.")
    except BaseException:
        for name in stored:
            storage.delete_quietly(name)
        raise
    return stored


# --- URIs ---------------------------------------------------------------------------------


def storage_name_for_uri(uri: str) -> str | None:
    """The default-storage name a URI points at, or None when it lies outside default storage.

    The inverse of `datasets.storage.object_uri`. None also for the storage root
    itself, so that nothing ever deletes everything.
    """
    bucket = getattr(default_storage, "bucket_name", None)
    if bucket:
        start = f"s3://{bucket}/"
        if not uri.startswith(start):
            return None
        key = uri[len(start) :]
        location = str(getattr(default_storage, "location", "") or "").strip("/")
        if location:
            if not key.startswith(location + "/"):
                return None
            key = key[len(location) + 1 :]
        key = key.strip("/")
        return key or None
    local = _file_path(uri)
    if local is None:
        return None
    root = Path(default_storage.path("")).resolve()
    try:
        relative = local.resolve().relative_to(root)
    except ValueError:
        return None
    return relative.as_posix() if relative.parts else None


def _file_path(uri: str) -> Path | None:
    parsed = urlparse(uri)
    if parsed.scheme != "file" or parsed.netloc not in ("", "localhost"):
        return None
    return Path(unquote(parsed.path))


def open_uri(uri: str) -> BinaryIO:
    """Open one object by URI for reading: default storage, a local file, or any S3 bucket."""
    name = storage_name_for_uri(uri)
    if name is not None:
        return storage.open_object(name)
    local = _file_path(uri)
    if local is not None:
        return local.open("rb")
    parsed = urlparse(uri)
    if parsed.scheme == "s3" and parsed.netloc:
        import boto3

        client = boto3.client(
            "s3",
            endpoint_url=getattr(settings, "AWS_S3_ENDPOINT_URL", None),
            region_name=getattr(settings, "AWS_S3_REGION_NAME", None),
        )
        body = client.get_object(Bucket=parsed.netloc, Key=parsed.path.lstrip("/"))["Body"]
        return cast(BinaryIO, body)
    raise ValueError(f"Unsupported URI {uri!r}: expected s3://bucket/key or file:///path.")


def join_uri(prefix: str, name: str) -> str:
    return prefix.rstrip("/") + "/" + name


def delete_prefix(uri: str) -> None:
    """Delete every stored object under a prefix URI, best effort.

    Only within default storage: a URI elsewhere (a base model referenced in
    place, another bucket) is left alone and logged.
    """
    name = storage_name_for_uri(uri)
    if name is None:
        log.warning("modelregistry.artifacts_not_deleted", uri=uri, reason="outside storage")
        return
    try:
        try:
            local: Path | None = Path(default_storage.path(name))
        except NotImplementedError:  # remote storage (S3)
            local = None
        if local is not None:
            shutil.rmtree(local, ignore_errors=True)
        else:
            _delete_tree(name)
    except Exception:
        log.exception("modelregistry.artifacts_delete_failed", uri=uri)


def _delete_tree(name: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        dirs, files = default_storage.listdir(name)
        for file in files:
            storage.delete_quietly(f"{name}/{file}")
        for folder in dirs:
            _delete_tree(f"{name}/{folder}")


@dataclass(frozen=True)
class ModelShape:
    """What the control plane knows of a model directory without loading it."""

    layers: int | None
    parameters: int | None
    #: The vocabulary size of its config (models sharing a tokenizer share it).
    vocab_size: int | None


_LAYER_KEYS: Final = ("num_hidden_layers", "n_layer", "num_layers")


@lru_cache(maxsize=256)
def model_shape(uri: str) -> ModelShape:
    """Layers (config.json) and parameter count (the safetensors header: no tensor is read)
    of the Hugging Face directory at `uri`. Artifacts never change, so it is cached."""
    with open_uri(join_uri(uri, "config.json")) as stream:
        config = json.loads(stream.read())
    layers = next((int(config[k]) for k in _LAYER_KEYS if isinstance(config.get(k), int)), None)
    vocab = config.get("vocab_size")
    parameters: int | None = None
    try:
        with open_uri(join_uri(uri, "model.safetensors")) as stream:
            (length,) = struct.unpack("<Q", stream.read(8))
            header = json.loads(stream.read(length))
        parameters = sum(
            math.prod(int(d) for d in info["shape"])
            for name, info in header.items()
            if name != "__metadata__"
        )
    except (OSError, ValueError, KeyError, struct.error):
        parameters = None  # sharded or unreadable: the estimate falls back to layers
    return ModelShape(
        layers=layers, parameters=parameters, vocab_size=vocab if isinstance(vocab, int) else None
    )
