"""What every sampler's step loop shares: the grid as Python floats, a level for each sample, the fresh
noise of a step."""

from __future__ import annotations

import torch


def levels(sigmas) -> list[float]:
    """The noise levels as Python floats: one device read per sampling run, so the loop's control
    flow and scalar arithmetic (float64) never wait for the device."""
    return [float(s) for s in sigmas]


def per_sample(sigma: float, x: torch.Tensor) -> torch.Tensor:
    """The noise level ``sigma`` once for each sample of batch ``x`` ([B], ``x``'s dtype and device):
    what a denoiser takes."""
    return sigma * x.new_ones(x.shape[0])


def step_noise(noise, i: int, x: torch.Tensor) -> torch.Tensor:
    """The fresh standard normal noise of step ``i``, shaped like ``x``: from ``noise(i, x)`` (per-sample
    seeds, :class:`difflab.noise.SeededNoise`) when given, else from torch's global generator."""
    return noise(i, x) if noise is not None else torch.randn_like(x)
