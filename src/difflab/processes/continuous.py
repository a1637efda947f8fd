"""Part 4 of the series: continuous-time Gaussian diffusion, t uniform in (0, 1].

- VP with linear beta (Song et al.'s VP SDE): dz = -beta(t)/2 z dt + sqrt(beta(t)) dW,
  beta(t) = beta_min + t (beta_max - beta_min), so log gammabar(t) = -int_0^t beta / 2.
- VP cosine: gammabar(t) = cos((t + s)/(1 + s) pi/2) / cos(s/(1 + s) pi/2).
- VE (Song's NCSN++ SDE): z_t = x + sigma(t) s, sigma(t) = sigma_min (sigma_max/sigma_min)^t.
- Flow (rectified flow, :mod:`difflab.processes.flow`): z_t = (1 - t) x + t s.

Each keeps the :class:`~difflab.processes.gaussian.GaussianProcess` contract, so
every sampler, the probability-flow ODE and the likelihood work for each. The
SDE coefficients of dz = f(t) z dt + g(t) dW follow from gammabar and sigmabar alone:
f = d log gammabar / dt and g^2 = d sigmabar^2/dt - 2 f sigmabar^2 (see :func:`sde_coefficients`).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from difflab.errors import UsageError
from difflab.processes.flow import Flow
from difflab.processes.gaussian import GaussianProcess


class VPLinear(GaussianProcess):
    """Variance preserving SDE with linear beta(t), beta from 0.1 to 20 (DDPM's limit)."""

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, t_min: float = 1e-5):
        self.beta_min, self.beta_max = beta_min, beta_max
        self.t_min, self.t_max = t_min, 1.0

    def _log_signal_scale(self, t):
        return -0.5 * (self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t**2)

    def signal_scale(self, t):
        return torch.exp(self._log_signal_scale(torch.as_tensor(t)))

    def noise_scale(self, t):
        return (-torch.expm1(2 * self._log_signal_scale(torch.as_tensor(t)))).clamp_min(0).sqrt()

    def t_of(self, sigma_ve):
        s = torch.as_tensor(sigma_ve)
        L = torch.log1p(s.double() ** 2)  # = b0 t + (b1 - b0) t^2 / 2
        d = self.beta_max - self.beta_min
        t = (-self.beta_min + torch.sqrt(self.beta_min**2 + 2 * d * L)) / d
        return t.to(s.dtype if s.is_floating_point() else torch.float32)

    def beta(self, t):
        return self.beta_min + torch.as_tensor(t) * (self.beta_max - self.beta_min)

    def timesteps(self, steps: int) -> torch.Tensor:
        return torch.linspace(self.t_max, self.t_min, steps, dtype=torch.float64)

    def config(self) -> dict[str, Any]:
        return {"kind": "vp", "beta_min": self.beta_min, "beta_max": self.beta_max, "t_min": self.t_min}


class VPCosine(GaussianProcess):
    """Variance preserving process with the cosine signal scale (t_max < 1 keeps sigma_ve finite)."""

    def __init__(self, offset: float = 0.008, t_min: float = 1e-5, t_max: float = 0.9946):
        self.offset, self.t_min, self.t_max = offset, t_min, t_max
        self._c0 = math.cos(offset / (1 + offset) * math.pi / 2)

    def signal_scale(self, t):
        t = torch.as_tensor(t)
        return torch.cos((t + self.offset) / (1 + self.offset) * math.pi / 2) / self._c0

    def noise_scale(self, t):
        return (1 - self.signal_scale(t) ** 2).clamp_min(0).sqrt()

    def t_of(self, sigma_ve):
        s = torch.as_tensor(sigma_ve)
        a = 1 / torch.sqrt(1 + s.double() ** 2)
        t = torch.acos((a * self._c0).clamp(-1, 1)) * 2 / math.pi * (1 + self.offset) - self.offset
        return t.to(s.dtype if s.is_floating_point() else torch.float32)

    def timesteps(self, steps: int) -> torch.Tensor:
        return torch.linspace(self.t_max, self.t_min, steps, dtype=torch.float64)

    def config(self) -> dict[str, Any]:
        return {"kind": "vp-cosine", "offset": self.offset, "t_min": self.t_min, "t_max": self.t_max}


class VE(GaussianProcess):
    """Variance exploding: z_t = x + sigma(t) s with geometric sigma from 0.01 to 50."""

    variance_preserving = False

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0, t_min: float = 0.0):
        if not 0 < sigma_min < sigma_max:
            raise UsageError("VE needs 0 < sigma_min < sigma_max")
        self.s_min, self.s_max = sigma_min, sigma_max
        self.t_min, self.t_max = t_min, 1.0

    def signal_scale(self, t):
        t = torch.as_tensor(t)
        return torch.ones_like(t, dtype=t.dtype if t.is_floating_point() else torch.float32)

    def noise_scale(self, t):
        t = torch.as_tensor(t)
        return self.s_min * (self.s_max / self.s_min) ** t

    def sigma_ve(self, t):
        return self.noise_scale(t)

    def t_of(self, sigma_ve):
        s = torch.as_tensor(sigma_ve)
        return (torch.log(s / self.s_min) / math.log(self.s_max / self.s_min)).to(
            s.dtype if s.is_floating_point() else torch.float32
        )

    def timesteps(self, steps: int) -> torch.Tensor:
        return torch.linspace(self.t_max, self.t_min, steps, dtype=torch.float64)

    def config(self) -> dict[str, Any]:
        return {"kind": "ve", "sigma_min": self.s_min, "sigma_max": self.s_max, "t_min": self.t_min}


def sde_coefficients(process: GaussianProcess, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drift scale f(t) and squared diffusion g(t)^2 of dz = f(t) z dt + g(t) dW, from gammabar and
    sigmabar by automatic differentiation (float64): f = d log gammabar/dt, g^2 = d sigmabar^2/dt - 2 f sigmabar^2.
    For VP linear this gives f = -beta/2, g^2 = beta; for VE f = 0, g^2 = d sigma^2/dt."""
    with torch.enable_grad():  # samplers run under no_grad
        t = torch.as_tensor(t, dtype=torch.float64).detach().requires_grad_(True)
        log_a = torch.log(process.signal_scale(t).double()) + 0 * t
        s2 = process.noise_scale(t).double() ** 2
        f = torch.autograd.grad(log_a.sum(), t, retain_graph=True)[0]
        ds2 = torch.autograd.grad(s2.sum(), t)[0]
    return f.detach(), (ds2 - 2 * f * s2).detach()


CONTINUOUS = {"vp": VPLinear, "vp-cosine": VPCosine, "ve": VE, "flow": Flow}


def make_process(config: dict[str, Any]) -> GaussianProcess:
    """Rebuild any Gaussian process from its ``config()`` dict (discrete schedules included)."""
    from difflab.processes.gaussian import make_schedule

    config = dict(config)
    kind = config.pop("kind", "discrete")
    if kind == "discrete":
        return make_schedule(config.pop("schedule", "linear"), **config)
    if kind not in CONTINUOUS:
        raise UsageError(f"unknown process '{kind}'; choose discrete, {', '.join(CONTINUOUS)}")
    return CONTINUOUS[kind](**config)
