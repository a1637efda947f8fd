"""The training data order and the loader that reads it.

:class:`BatchOrder` is the order: sample position p of the run (global batch b, position i in it,
p = b * batch_size + i) is image ``perm(e)[p mod N]`` of epoch e = p // N, where ``perm(e)`` is a
permutation of (seed, e) drawn on the CPU. A rank's share of a micro-batch is a contiguous range of
positions, so it is a slice of at most a few permutations, and nothing but (seed, step, rank) decides
it: a run resumes bit-identically, mid-epoch included, with any number of processes.

:class:`BatchLoader` reads a rank's share of (step, micro-batch): in-memory data is indexed directly;
a streamed source is read ahead by worker processes (``torch.utils.data.DataLoader`` with a sampler
of (step, micro-batch) keys from the one asked for on), into pinned memory on GPUs. Only the current
batches, never the data set, reach the device.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from difflab.data.imagedata import ImageData
from difflab.data.source import ImageSource

Key = tuple[int, int]  # (step, micro-batch)


class BatchOrder:
    """Which images rank ``rank`` of ``world`` trains on in each micro-batch of each global batch."""

    def __init__(self, n: int, seed: int, batch_size: int, grad_accum: int = 1, world: int = 1, rank: int = 0):
        if n < 1:
            raise ValueError("a data order needs at least one image")
        self.n, self.seed, self.batch_size = n, seed, batch_size
        self.per_micro = batch_size // grad_accum
        self.per_rank = self.per_micro // world
        self.rank = rank
        self._perms: dict[int, torch.Tensor] = {}

    def perm(self, epoch: int) -> torch.Tensor:
        """The order of epoch ``epoch`` (int64 on the CPU); the current and the next one are kept."""
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            if len(self._perms) > 1:
                self._perms.pop(min(self._perms))
            self._perms[epoch] = torch.randperm(self.n, generator=g)
        return self._perms[epoch]

    def first_position(self, micro: int) -> int:
        """This rank's first position within a global batch in micro-batch ``micro``."""
        return micro * self.per_micro + self.rank * self.per_rank

    def indices(self, batch: int, micro: int) -> torch.Tensor:
        """The image indices (int64 [per_rank], CPU) of this rank's share of ``micro`` of global ``batch``."""
        first = batch * self.batch_size + self.first_position(micro)
        end, parts, p = first + self.per_rank, [], first
        while p < end:
            e, off = divmod(p, self.n)
            take = min(self.n - off, end - p)
            parts.append(self.perm(e)[off:off + take])
            p += take
        return parts[0] if len(parts) == 1 else torch.cat(parts)


def default_workers() -> int:
    """Decoding processes for a streamed source: all but one of this process's cores, 1 to 8."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        cores = os.cpu_count() or 1
    return max(1, min(8, cores - 1))


class _Keys(Sampler):
    """(step, micro, indices) from ``start`` on, without end: the loop stops reading when it stops."""

    def __init__(self, order: BatchOrder, batch_index: Callable[[int], int], grad_accum: int, start: Key):
        self.order, self.batch_index, self.grad_accum, self.start = order, batch_index, grad_accum, start

    def __iter__(self) -> Iterator[tuple[int, int, torch.Tensor]]:
        step, micro = self.start
        while True:
            yield step, micro, self.order.indices(self.batch_index(step), micro)
            micro += 1
            if micro == self.grad_accum:
                step, micro = step + 1, 0


class _Reads(Dataset):
    """One batch per key, read in a worker process."""

    def __init__(self, source: ImageSource):
        self.source = source

    def __getitem__(self, key: tuple[int, int, torch.Tensor]) -> tuple[int, int, torch.Tensor, torch.Tensor]:
        step, micro, idx = key
        return step, micro, idx, self.source.read(idx)


class BatchLoader:
    """A rank's batches of ``source`` in ``order``, on ``device``; ``batch_index(step)`` is the global batch
    a step trains on (the method's)."""

    def __init__(self, source: ImageSource, order: BatchOrder, batch_index: Callable[[int], int],
                 device: torch.device, grad_accum: int = 1, workers: int | None = None):
        self.source, self.order, self.batch_index = source, order, batch_index
        self.device, self.grad_accum = device, grad_accum
        self.streamed = not isinstance(source, ImageData)
        self.workers = (default_workers() if workers is None else workers) if self.streamed else 0
        self._it: Iterator | None = None
        self._next: Key | None = None

    def get(self, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """(uint8 images [B, C, H, W] on the device, int64 labels on the device or None, indices on the CPU)
        of this rank's share of micro-batch ``micro`` of ``step``."""
        if not self.streamed:
            idx = self.order.indices(self.batch_index(step), micro)
            images = self.source.read(idx)
        else:
            if self._it is None or self._next != (step, micro):
                self._start((step, micro))
            got_step, got_micro, idx, images = next(self._it)
            assert (got_step, got_micro) == (step, micro)  # the sampler yields keys in order
            micro += 1
            self._next = (step + 1, 0) if micro == self.grad_accum else (step, micro)
        labels = self.source.labels
        labels = None if labels is None else labels[idx].to(self.device, non_blocking=True)
        return images.to(self.device, non_blocking=True), labels, idx

    def _start(self, key: Key) -> None:
        self.close()
        cuda = self.device.type == "cuda"
        sampler = _Keys(self.order, self.batch_index, self.grad_accum, key)
        loader = DataLoader(_Reads(self.source), sampler=sampler, batch_size=None, num_workers=self.workers,
                            pin_memory=cuda, prefetch_factor=(4 if cuda else 2) if self.workers else None)
        self._it = iter(loader)

    def close(self) -> None:
        """Stop the worker processes (a later :meth:`get` starts them again): the DataLoader's iterator
        stops them when it is freed."""
        self._it, self._next = None, None
