"""Safetensors only: the one check every model, checkpoint and adapter directory passes
before training or serving loads it.

A pickle (`*.bin`, `*.pt`, … as `torch.save` writes them) runs code when it is
loaded, so a directory holding one is refused outright, even beside safetensors
weights, and `from_pretrained` is told to read safetensors only. Training and
inference both load through this module; the control plane refuses the same
suffixes when a base model is imported (controlplane.modelregistry.artifacts).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Final

#: Suffixes of pickle-based weight and state files (torch.save, joblib, Lightning).
PICKLE_SUFFIXES: Final = (".bin", ".pt", ".pth", ".pkl", ".ckpt", ".pickle")


class UnsafeWeights(ValueError):
    """A directory that holds pickle files, or no safetensors weights: it is not loaded."""


def require_safetensors(
    folder: Path, *, what: str = "the model", weights: str = "*.safetensors"
) -> None:
    """Refuse (UnsafeWeights) `folder` if any file under it is a pickle, or if no file
    directly in it matches `weights` (e.g. "adapter_model.safetensors" for an adapter).

    The message names the files and says how to convert them.
    """
    pickles = sorted(
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*")
        if p.suffix.lower() in PICKLE_SUFFIXES and p.is_file()
    )
    if pickles:
        listed = ", ".join(pickles[:5]) + (", …" if len(pickles) > 5 else "")
        raise UnsafeWeights(
            f"{what} holds pickle files ({listed}), which run code when loaded; only "
            "safetensors weights are loaded. Convert them (load the model once in a trusted "
            "environment, then save_pretrained(out, safe_serialization=True)) and remove the "
            "pickle files."
        )
    if not any(folder.glob(weights)):
        raise UnsafeWeights(f"{what} has no safetensors weights ({weights})")


def pretrained_kwargs() -> dict[str, Any]:
    """Keywords for every `from_pretrained` of weights: transformers reads safetensors only."""
    return {"use_safetensors": True}
