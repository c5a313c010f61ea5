"""Checkpoints in safetensors and JSON only: never pickle, never `torch.save`.

A checkpoint directory holds the weights as `save_weights` writes them (LoRA:
adapter_model.safetensors + adapter_config.json; full: model.safetensors +
config.json), the tokenizer, `optimizer.safetensors` (the optimizer's tensors,
flattened to `state.<param>.<name>`, with its param groups, non-tensor state and
the LR scheduler's state as JSON in the file's metadata) and `trainer_state.json`,
written last: a directory without it is incomplete.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from gpuworkers.training.errors import TrainingError

OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "trainer_state.json"


def save_optimizer(path: Path, optimizer: torch.optim.Optimizer, scheduler: Any) -> None:
    state_dict = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    other: dict[str, dict[str, Any]] = {}
    for param_id, param_state in state_dict["state"].items():
        for name, value in param_state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{param_id}.{name}"] = value.detach().to("cpu").contiguous()
            else:
                other.setdefault(str(param_id), {})[name] = value
    metadata = {
        "param_groups": json.dumps(state_dict["param_groups"]),
        "state": json.dumps(other),
        "scheduler": json.dumps(scheduler.state_dict()),
        "format": "atelier-optimizer-v1",
    }
    save_file(tensors, str(path), metadata=metadata)


def load_optimizer(path: Path, optimizer: torch.optim.Optimizer, scheduler: Any) -> None:
    if not path.exists():
        raise TrainingError("checkpoint_unavailable", f"the checkpoint has no {path.name}")
    state: dict[int, dict[str, Any]] = {}
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        for key in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
            _, param_id, name = key.split(".", 2)
            state.setdefault(int(param_id), {})[name] = handle.get_tensor(key)
    for param_id, values in json.loads(metadata.get("state", "{}")).items():
        state.setdefault(int(param_id), {}).update(values)
    groups = json.loads(metadata["param_groups"])
    for group in groups:
        if isinstance(group.get("betas"), list):
            group["betas"] = tuple(group["betas"])
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    scheduler.load_state_dict(json.loads(metadata["scheduler"]))


def write_state(directory: Path, state: dict[str, Any]) -> None:
    (directory / STATE_FILE).write_text(json.dumps(state, indent=2, sort_keys=True))


def read_state(directory: Path) -> dict[str, Any]:
    path = directory / STATE_FILE
    if not path.exists():
        raise TrainingError(
            "checkpoint_unavailable", f"the checkpoint is incomplete: no {STATE_FILE}"
        )
    state = json.loads(path.read_text())
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise TrainingError("checkpoint_unavailable", f"{STATE_FILE} has no step")
    return state


def name(step: int) -> str:
    return f"step-{step:08d}"
