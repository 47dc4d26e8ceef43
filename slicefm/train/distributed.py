"""Where a training process runs: rank, world size and device, and the DDP helpers the loop needs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @classmethod
    def current(cls) -> DistContext:
        """Rank / world of the initialised process group (single process otherwise); CUDA device by local rank."""
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        if torch.cuda.is_available():
            device = torch.device("cuda", torch.cuda.current_device())
        else:
            device = torch.device("cpu")
        return cls(rank, world, device)

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes checkpoints and exports, and reports metrics."""
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def all_gather_object(self, obj: Any) -> list[Any]:
        """`obj` of every rank, in rank order ([obj] in a single process)."""
        if self.world == 1:
            return [obj]
        gathered: list[Any] = [None] * self.world
        dist.all_gather_object(gathered, obj)
        return gathered


def prepare_model(model: nn.Module, ctx: DistContext) -> tuple[nn.Module, nn.Module]:
    """Move `model` to the context's device; multi-GPU: SyncBatchNorm (the official moco-v3 recipe).

    Returns (model, the module to call in training steps: a DDP wrapper of it when world > 1)."""
    model = model.to(ctx.device)
    if ctx.world > 1 and ctx.device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if ctx.world == 1:
        return model, model
    return model, DDP(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
