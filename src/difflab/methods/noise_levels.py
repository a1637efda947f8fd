"""Where a Gaussian method trains: the distribution of the training times t, from one uniform u per sample.

- ``uniform``: t uniform over the process's range (DDPM; discrete schedules: the integer steps 1..T).
- ``lognormal``: EDM's log sigma ~ N(P_mean, P_std^2) with P_mean = -1.2, P_std = 1.2 (Karras et al. 2022),
  drawn by the inverse normal CDF of u and mapped to time by ``process.t_of``, clamped to the process's
  range (the mass beyond it piles up at its ends). Discrete schedules round t to the nearest step: the
  network is evaluated only at integer steps when sampling, the zprev target needs one, and t_of
  interpolates log sigma linearly between steps, so rounding t rounds log sigma to the nearest step's.
- ``logit-normal``: SD3's (Esser et al. 2024) logit(tau) ~ N(mean, std^2), 0 and 1 by default, with tau the
  flow process's time, i.e. log sigma_ve = logit(tau) ~ N(mean, std^2): a lognormal in sigma, which gives
  every process the same noise levels as the flow process and rounds to steps as ``lognormal`` does.

``shift`` (SD3's resolution shift) multiplies every training noise level sigma_ve by ``shift``: on the flow
process t' = shift t / (1 + (shift - 1) t), SD3's formula, and the same change of noise level on the others.
"""

from __future__ import annotations

import math

import torch

from difflab.processes.gaussian import GaussianProcess

P_MEAN, P_STD = -1.2, 1.2
LOGIT_MEAN, LOGIT_STD = 0.0, 1.0


def lognormal_sigma(u: torch.Tensor, p_mean: float = P_MEAN, p_std: float = P_STD) -> torch.Tensor:
    """sigma = exp(p_mean + p_std n) with n = Phi^-1(u) standard normal (float64)."""
    n = math.sqrt(2) * torch.erfinv(2 * u.double() - 1)
    return torch.exp(p_mean + p_std * n)


def _uniform(p: GaussianProcess, u: torch.Tensor, **_) -> torch.Tensor:
    if p.discrete:
        return (u * p.T).floor().clamp(max=p.T - 1) + 1
    return p.t_min + (p.t_max - p.t_min) * (1 - u)


def _of_sigma(p: GaussianProcess, sigma: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    t = p.t_of(sigma).double()
    if p.discrete:
        return t.round().clamp(1, p.T).to(dtype)
    return t.clamp(p.t_min, p.t_max).to(dtype)


def _lognormal(p: GaussianProcess, u: torch.Tensor, **_) -> torch.Tensor:
    return _of_sigma(p, lognormal_sigma(u), u.dtype)


def _logit_normal(p: GaussianProcess, u: torch.Tensor, mean: float = LOGIT_MEAN, std: float = LOGIT_STD) -> torch.Tensor:
    # the flow time tau = sigma / (1 + sigma), so logit(tau) = log sigma: a lognormal sigma of the same parameters
    return _of_sigma(p, lognormal_sigma(u, mean, std), u.dtype)


NOISE_SAMPLINGS = {"uniform": _uniform, "lognormal": _lognormal, "logit-normal": _logit_normal}


def training_times(p: GaussianProcess, u: torch.Tensor, kind: str = "uniform", mean: float = LOGIT_MEAN,
                   std: float = LOGIT_STD, shift: float = 1.0) -> torch.Tensor:
    """The training times of uniforms ``u`` in (0, 1) under noise sampling ``kind`` (``mean`` and ``std``:
    logit-normal's), with the noise levels multiplied by ``shift``."""
    t = NOISE_SAMPLINGS[kind](p, u, mean=mean, std=std)
    if shift != 1:
        t = _of_sigma(p, shift * p.sigma_ve(t.double()), u.dtype)
    if not p.discrete:
        # the flow process's t = 1 is pure noise (sigma_ve = inf): nothing to learn and no finite input,
        # so the top time is the largest float below it
        top = torch.nextafter(torch.tensor(p.t_max, dtype=t.dtype), torch.tensor(0.0, dtype=t.dtype)).to(t.device)
        t = torch.where(torch.isinf(p.sigma_ve(t.double())), top, t)
    return t
