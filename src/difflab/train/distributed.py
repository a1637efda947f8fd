"""PyTorch's own distributed engine, nothing home-made: processes are started by
torchrun (or ``difflab train --nproc N``, which calls torchrun), gradients are averaged
by DistributedDataParallel, NCCL on GPUs and gloo on CPUs."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistContext:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    @classmethod
    def from_env(cls, device_kind: str = "cpu") -> DistContext:
        """Join the process group torchrun described in the environment (a no-op when run alone)."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        if not dist.is_initialized():
            backend = "nccl" if device_kind == "cuda" else "gloo"
            dist.init_process_group(backend=backend)
        return cls(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def any(self, flag: bool, device) -> bool:
        """True on every rank when ``flag`` is true on any rank."""
        if not self.active:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def gather_cat(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate each rank's tensor (equal shapes) in rank order, on every rank."""
        if not self.active:
            return x
        parts = [torch.empty_like(x) for _ in range(self.world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    def shutdown(self) -> None:
        if self.active and dist.is_initialized():
            dist.destroy_process_group()


def shard(n: int, ctx: DistContext) -> range:
    """The sample indices rank ``ctx.rank`` draws of n (contiguous blocks, so gathering in rank order
    restores 0..n-1)."""
    per = -(-n // ctx.world)
    return range(min(n, ctx.rank * per), min(n, (ctx.rank + 1) * per))
