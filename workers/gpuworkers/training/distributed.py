"""The ranks of one attempt: a single process, or torch's launcher with DDP.

`World()` is the single-process case and every collective is the identity.
`World.from_env()` reads what `torch.distributed.run` sets (RANK, WORLD_SIZE,
LOCAL_RANK, LOCAL_WORLD_SIZE); the backend is nccl on CUDA and gloo on CPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


@dataclass
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1
    device: torch.device = field(default_factory=lambda: _pick_device(0))

    @classmethod
    def from_env(cls) -> World:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        return cls(
            rank=int(os.environ.get("RANK", "0")),
            size=int(os.environ.get("WORLD_SIZE", "1")),
            local_rank=local_rank,
            local_size=int(os.environ.get("LOCAL_WORLD_SIZE", "1")),
            device=_pick_device(local_rank),
        )

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def init(self) -> None:
        if not self.distributed or dist.is_initialized():
            return
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        dist.init_process_group(backend="nccl" if self.device.type == "cuda" else "gloo")

    def shutdown(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over ranks (float64, so token counts stay exact)."""
        if not self.distributed:
            return values
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return [float(v) for v in tensor.tolist()]

    def broadcast(self, value: int) -> int:
        """Rank 0's value, on every rank."""
        if not self.distributed:
            return value
        tensor = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.broadcast(tensor, src=0)
        return int(tensor.item())

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        if not self.distributed:
            return model
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)


def _pick_device(local_rank: int) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def cpu_threads(local_size: int) -> int:
    """Threads per rank on CPU: the cores this process may use, shared among local ranks."""
    if os.environ.get("TORCH_NUM_THREADS"):
        return max(1, int(os.environ["TORCH_NUM_THREADS"]))
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, local_size))
