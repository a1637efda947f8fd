"""PyTorch's own distributed engine, nothing home-made: processes are started by
torchrun (or ``difflab train --nproc N``, which runs torchrun's launcher in-process),
gradients are averaged by DistributedDataParallel, NCCL on GPUs and gloo on CPUs.

Small control messages (the per-step "stop now?" vote, gathered samples) go over a
gloo group on the CPU, so they never wait for the GPU stream. Sampling and
evaluation split n samples into contiguous per-rank blocks (:func:`shard`) and
gather them in rank order (:func:`sample_sharded`): with per-sample seeds the
result is byte-identical to one process.
"""

from __future__ import annotations

import gc
import os
import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from difflab.errors import UsageError

_cpu_group: Any = None  # the gloo group of an NCCL world (created once per process)


def _control_group() -> Any:
    """A process group that works on CPU tensors: the default one when it is gloo, else a gloo copy."""
    global _cpu_group
    if dist.get_backend() == "gloo":
        return None  # None means the default group
    if _cpu_group is None:
        _cpu_group = dist.new_group(backend="gloo")
    return _cpu_group


@dataclass
class DistContext:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    group: Any = field(default=None, repr=False, compare=False)  # gloo group for CPU collectives

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
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if not dist.is_initialized():
            if device_kind == "cuda":
                torch.cuda.set_device(local_rank)  # before NCCL starts, so each rank owns its GPU
            dist.init_process_group(backend="nccl" if device_kind == "cuda" else "gloo")
        return cls(dist.get_rank(), dist.get_world_size(), local_rank, _control_group())

    def barrier(self) -> None:
        if self.active:
            dist.barrier(group=self.group)

    def agree_max(self, values: Sequence[int]) -> list[int]:
        """The element-wise maximum of a few integers over all ranks (a CPU collective: no device sync)."""
        if not self.active:
            return list(values)
        t = torch.tensor(list(values), dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return t.tolist()

    def mean(self, x: torch.Tensor) -> torch.Tensor:
        """The average of ``x`` over all ranks (same shape on every rank; on x's device)."""
        if not self.active:
            return x
        x = x.clone()
        dist.all_reduce(x)  # SUM: gloo has no AVG
        return x / self.world

    def gather_cat(self, x: torch.Tensor | None) -> torch.Tensor:
        """Each rank's rows concatenated in rank order, on the CPU of every rank. Row counts may differ,
        the rest of the shape and the dtype must match; a rank with nothing passes None."""
        if not self.active:
            if x is None:
                raise ValueError("gather_cat: nothing to gather")
            return x.cpu()
        x = None if x is None else x.detach().cpu().contiguous()
        meta: list[Any] = [None] * self.world
        dist.all_gather_object(meta, None if x is None else (len(x), tuple(x.shape[1:]), x.dtype), group=self.group)
        known = [m for m in meta if m is not None]
        if not known:
            raise ValueError("gather_cat: nothing to gather on any rank")
        _, rest, dtype = known[0]
        if any(m[1:] != (rest, dtype) for m in known):
            raise ValueError(f"gather_cat: ranks hold different shapes/dtypes {[m[1:] for m in known]}")
        counts = [0 if m is None else m[0] for m in meta]
        padded = torch.zeros((max(counts), *rest), dtype=dtype)
        if x is not None:
            padded[: len(x)] = x
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(parts, padded, group=self.group)
        return torch.cat([p[:c] for p, c in zip(parts, counts)])

    def shutdown(self) -> None:
        """Leave the process group, together: every rank waits for the others first (a rank that
        destroys its group while a peer still uses it can abort that peer at exit). DDP modules must be
        gone by then (``Trainer.run`` drops its own; see ``Trainer.release_process_group``)."""
        global _cpu_group
        if self.active and dist.is_initialized():
            gc.collect()  # DDP wrappers in reference cycles would outlive the group's Python handle
            dist.barrier(group=self.group)
            dist.destroy_process_group()
            _cpu_group = None


def shard(n: int, ctx: DistContext, block: int = 1) -> range:
    """The indices rank ``ctx.rank`` handles of 0..n-1: a contiguous run (so gathering in rank order
    restores 0..n-1) whose ends are multiples of ``block`` (e.g. a batch size, for samplers whose
    randomness is per batch rather than per sample)."""
    blocks = -(-n // block)
    per = -(-blocks // ctx.world) * block
    return range(min(n, ctx.rank * per), min(n, (ctx.rank + 1) * per))


def sample_sharded(fn: Callable[[int, int], torch.Tensor], n: int, ctx: DistContext, block: int = 1) -> torch.Tensor:
    """Produce n rows split over the ranks: each rank calls ``fn(start, count)`` for its :func:`shard`
    (never with count 0) and every rank gets all n rows, in order, on the CPU.

    ``fn`` must make row j depend only on j (e.g. ``run.sample(count, seed=s, start=start)``, or
    features of those samples); then the result equals ``fn(0, n)`` in one process, byte for byte.
    Every rank must call this together (it is a collective)."""
    part = shard(n, ctx, block)
    local = fn(part.start, len(part)) if len(part) else None
    return ctx.gather_cat(local)


def launch(nproc: int, argv: Sequence[str]) -> int:
    """Run ``python -m difflab ARGV`` in ``nproc`` processes on this machine with torchrun's own
    launcher, inside this process: a SIGTERM or Ctrl-C sent to it reaches every worker, which finish
    their step, save and exit; this then returns 0 (SIGTERM) or 130 (SIGINT), or the first failed
    worker's exit code (its message is printed above by the worker)."""
    if nproc < 1:
        raise UsageError(f"--nproc must be at least 1, got {nproc}")
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    args = parse_args(["--standalone", f"--nproc-per-node={nproc}", "-m", "difflab"])
    args.training_script_args = list(argv)  # set after parsing: torchrun would read '--n' as its '--nnodes'
    print(f"launching: torchrun --standalone --nproc-per-node={nproc} -m difflab -- {' '.join(argv)}",
          file=sys.stderr, flush=True)
    try:
        run(args)
    except SignalException as e:
        return 130 if e.sigval == signal.SIGINT else 0
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        code = failure.exitcode if failure.exitcode >= 0 else 128 - failure.exitcode
        print(f"difflab: {nproc} processes launched, rank {rank} exited with code {code}", file=sys.stderr)
        return code
    return 0
