"""What every sampler's step loop shares: the grid as Python floats, a level for each sample, the fresh
noise of a step."""

from __future__ import annotations

import math

import torch


def levels(sigmas) -> list[float]:
    """The noise levels as Python floats: one device read per sampling run, so the loop's control
    flow and scalar arithmetic (float64) never wait for the device."""
    return [float(s) for s in sigmas]


def per_sample(sigma: float, x: torch.Tensor) -> torch.Tensor:
    """The noise level ``sigma`` once for each sample of batch ``x`` ([B], ``x``'s dtype and device):
    what a denoiser takes."""
    return sigma * x.new_ones(x.shape[0])


def noise_estimate(x: torch.Tensor, x0: torch.Tensor, sigma: float) -> torch.Tensor:
    """The noise estimate (y - x0_hat) / sigma of a sample at level ``sigma``; at an infinite level (the flow
    process's t = 1) the sample is held as y / sigma, which is that estimate in the limit."""
    return x if math.isinf(sigma) else (x - x0) / sigma


def step_noise(noise, i: int, x: torch.Tensor) -> torch.Tensor:
    """The fresh standard normal noise of step ``i``, shaped like ``x``: from ``noise(i, x)`` (per-sample
    seeds, :class:`difflab.noise.SeededNoise`) when given, else from torch's global generator."""
    return noise(i, x) if noise is not None else torch.randn_like(x)
