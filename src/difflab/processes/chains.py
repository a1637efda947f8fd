"""The forward process of each family as a chain of states: clean images x ([B, C, H, W], model units) at a
row of levels from t = 0 to the end, stacked [K, B, C, H, W] with their times. The methods' ``noising_chain``
(``difflab figures``' noising.png) and :mod:`difflab.forward` (the page's forward panel) both draw these, so
the same process, images and generator give the same chain in both. Binomial noise has no states between its
steps: its chain is every step, :meth:`BinomialNoise.chain <difflab.processes.binomial.BinomialNoise.chain>`.
"""

from __future__ import annotations

import torch

from difflab.processes.binomial import PixelNoise
from difflab.processes.degradations import Degradation
from difflab.processes.gaussian import GaussianProcess


def unit_variance(process: GaussianProcess, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """z_t / sqrt(gammabar_t^2 + sigmabar_t^2): the marginal at unit variance (VP: z_t itself)."""
    return z / torch.sqrt(process.signal_scale(t) ** 2 + process.noise_scale(t) ** 2).float()


def gaussian_chain(process: GaussianProcess, x: torch.Tensor, levels: int,
                   generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(times float64 [levels] from t_min to t_max, whole steps for discrete schedules; the marginals z_t at
    unit variance, so that VE processes (sigmabar up to 50) stay visible). One noise image per image of x,
    growing along its row."""
    ts = torch.linspace(process.t_min, process.t_max, levels, dtype=torch.float64)
    if process.discrete:
        ts = ts.round()
    s = torch.randn(x.shape, generator=generator)
    return ts, torch.stack([unit_variance(process, process.marginal(x, t.expand(len(x)), s), t) for t in ts])


def pixel_chain(x: torch.Tensor, levels: int, generator: torch.Generator) -> tuple[list[int], torch.Tensor]:
    """(the steps 0 .. T = h w, evenly spaced; z_t at them): one pixel order per image, so a row is one chain."""
    noise = PixelNoise(*x.shape[-2:])
    state = noise.prepare(x, generator)
    steps = [round(noise.T * i / (levels - 1)) for i in range(levels)]
    return steps, torch.stack([noise.apply(x, t, state) for t in steps])


def degradation_chain(degradation: Degradation, x: torch.Tensor, levels: int,
                      generator: torch.Generator) -> tuple[list[float], torch.Tensor]:
    """(t = 0 .. 1, evenly spaced; D(x, t) at them), the degradation's randomness drawn once per image."""
    state = degradation.prepare(x, generator)
    ts = [i / (levels - 1) for i in range(levels)]
    return ts, torch.stack([degradation.degrade(x, t, state) for t in ts])
