"""Where a Gaussian method trains: the distribution of the training times t, from one uniform u per sample.

- ``uniform``: t uniform over the process's range (DDPM; discrete schedules: the integer steps 1..T).
- ``lognormal``: EDM's log sigma ~ N(P_mean, P_std^2) with P_mean = -1.2, P_std = 1.2 (Karras et al. 2022),
  drawn by the inverse normal CDF of u and mapped to time by ``process.t_of``, clamped to the process's
  range (the mass beyond it piles up at its ends). Discrete schedules round t to the nearest step: the
  network is evaluated only at integer steps when sampling, the zprev target needs one, and t_of
  interpolates log sigma linearly between steps, so rounding t rounds log sigma to the nearest step's.
"""

from __future__ import annotations

import math

import torch

from difflab.processes.gaussian import GaussianProcess

P_MEAN, P_STD = -1.2, 1.2


def lognormal_sigma(u: torch.Tensor, p_mean: float = P_MEAN, p_std: float = P_STD) -> torch.Tensor:
    """sigma = exp(p_mean + p_std n) with n = Phi^-1(u) standard normal (float64)."""
    n = math.sqrt(2) * torch.erfinv(2 * u.double() - 1)
    return torch.exp(p_mean + p_std * n)


def _uniform(p: GaussianProcess, u: torch.Tensor) -> torch.Tensor:
    if p.discrete:
        return (u * p.T).floor().clamp(max=p.T - 1) + 1
    return p.t_min + (p.t_max - p.t_min) * (1 - u)


def _lognormal(p: GaussianProcess, u: torch.Tensor) -> torch.Tensor:
    t = p.t_of(lognormal_sigma(u)).double()
    if p.discrete:
        return t.round().clamp(1, p.T).to(u.dtype)
    return t.clamp(p.t_min, p.t_max).to(u.dtype)


NOISE_SAMPLINGS = {"uniform": _uniform, "lognormal": _lognormal}


def training_times(p: GaussianProcess, u: torch.Tensor, kind: str = "uniform") -> torch.Tensor:
    """The training times of uniforms ``u`` in (0, 1) under noise sampling ``kind``."""
    return NOISE_SAMPLINGS[kind](p, u)
