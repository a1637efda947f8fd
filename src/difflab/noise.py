"""Per-sample seeded Gaussian noise.

Every sample of a batch gets its own seed, and the noise of sample i at sampler
step k is a pure function of (seed_i, k, element index). So an image is the same
whatever the batch size, the number of ranks or the device, and a whole batch
is drawn in a few vectorised integer kernels instead of one generator per sample
(EDM's per-sample seeds, without the per-sample launches).

The integers go through a 32-bit avalanche hash (the "lowbias32" mixer), two
uniforms become one normal by Box-Muller.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

_MASK32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """Avalanche hash of 32-bit values held in int64 (products wrap modulo 2^64,
    only the low 32 bits are kept)."""
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def _uniform(key: torch.Tensor) -> torch.Tensor:
    """Uniform in (0, 1) from hashed keys, 24 bits of mantissa."""
    return ((_mix32(key) >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))


def _keys(seeds, step: int, count: int, salt: int, device) -> torch.Tensor:
    seeds = torch.as_tensor(seeds, dtype=torch.int64, device=device)
    row = _mix32(_mix32(seeds & _MASK32) ^ _mix32(seeds >> 32) ^ _mix32(torch.full_like(seeds, step + 0x9E3779B9)))
    row = _mix32(row ^ salt)
    idx = torch.arange(count, device=seeds.device, dtype=torch.int64)
    return _mix32(row[:, None] ^ (idx[None, :] * 2 + 1))


def seeded_uniform(seeds: torch.Tensor | Sequence[int], step: int, shape: Sequence[int] = (), device=None,
                   salt: int = 0x2545F491) -> torch.Tensor:
    """Uniform (0, 1) values of shape ``[len(seeds), *shape]``; row i depends only on (seeds[i], step, salt)."""
    n = math.prod(shape)
    return _uniform(_keys(seeds, step, n, salt, device)).reshape(-1, *shape)


def seeded_normal(
    seeds: torch.Tensor | Sequence[int], step: int, shape: Sequence[int], device=None
) -> torch.Tensor:
    """Standard normal noise of shape ``[len(seeds), *shape]``; row i depends only on
    ``(seeds[i], step)``.

    ``step`` tells apart the draws of one sample: 0 for the initial noise, k + 1 for
    the noise of sampler step k, and so on.
    """
    n = math.prod(shape)
    half = (n + 1) // 2
    key = _keys(seeds, step, half, 0, device)
    u1 = _uniform(key)
    u2 = _uniform(key ^ 0x5BD1E995)
    r = torch.sqrt(-2.0 * torch.log(u1))
    theta = (2.0 * math.pi) * u2
    z = torch.cat([r * torch.cos(theta), r * torch.sin(theta)], dim=1)[:, :n]
    return z.reshape(-1, *shape)


class SeededNoise:
    """The ``noise(i, like)`` callable the samplers take: fresh noise for step ``i``."""

    def __init__(self, seeds: torch.Tensor | Sequence[int], offset: int = 1):
        self.seeds = torch.as_tensor(seeds, dtype=torch.int64)
        self.offset = offset

    def initial(self, shape: Sequence[int], device=None, dtype=torch.float32) -> torch.Tensor:
        """The starting noise (step 0) for samples of ``shape`` (without the batch dim)."""
        return seeded_normal(self.seeds.to(device), 0, shape, device).to(dtype)

    def __call__(self, i: int, like: torch.Tensor) -> torch.Tensor:
        z = seeded_normal(self.seeds.to(like.device), i + self.offset, like.shape[1:], like.device)
        return z.to(like.dtype)


def sample_seeds(seed: int, n: int, start: int = 0) -> torch.Tensor:
    """The per-sample seeds of a run drawn with ``--seed seed``: sample j gets ``seed * 2**20 + j``,
    so sample j is the same whatever the batch size or the number of ranks."""
    return torch.arange(start, start + n, dtype=torch.int64) + int(seed) * (1 << 20)
