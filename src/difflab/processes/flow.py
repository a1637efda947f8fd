"""Rectified flow / flow matching (Liu et al. 2023; Lipman et al. 2023) as a Gaussian process:
z_t = (1 - t) x + t s, t in [t_min, 1], so gammabar = 1 - t and sigmabar = t.

Its VE noise level is sigma_ve = t / (1 - t), with inverse t = sigma / (1 + sigma): every sampler,
guidance rule and the likelihood work on it unchanged, and Euler steps in t on the velocity
dz/dt = s - x are exactly DDIM (eta = 0) steps between the same levels. Unlike the VP and VE processes
it reaches pure noise at t = 1 (sigma_ve = inf, z_1 = s): grids of its own time start there, and a
sample at an infinite level is held as y / sigma = z_1 (see :mod:`difflab.samplers`).
The time is the network's as for the other continuous processes (1000 t), which is also diffusers'
``FlowMatchEulerDiscreteScheduler`` timestep (sigma times 1000, its sigma being this t).
"""

from __future__ import annotations

from typing import Any

import torch

from difflab.errors import UsageError
from difflab.processes.gaussian import GaussianProcess


def _float(t: torch.Tensor) -> torch.dtype:
    return t.dtype if t.is_floating_point() else torch.float32


class Flow(GaussianProcess):
    """Rectified flow: signal scale 1 - t, noise scale t. ``t_min`` = 1e-3 is the bottom of diffusers'
    flow-matching grids (1 / num_train_timesteps), so the uniform grids of both are the same."""

    variance_preserving = False

    def __init__(self, t_min: float = 1e-3):
        if not 0 < t_min < 1:
            raise UsageError(f"the flow process needs 0 < t_min < 1, got {t_min}")
        self.t_min, self.t_max = t_min, 1.0

    def signal_scale(self, t):
        t = torch.as_tensor(t)
        return (1 - t).to(_float(t))

    def noise_scale(self, t):
        t = torch.as_tensor(t)
        return t.to(_float(t))

    def sigma_ve(self, t):
        t = torch.as_tensor(t)
        return (t / (1 - t)).to(_float(t))  # inf at t = 1

    def t_of(self, sigma_ve):
        s = torch.as_tensor(sigma_ve)
        # 1 - 1 / (1 + sigma) rather than sigma / (1 + sigma): exact 1 at sigma = inf, not inf / inf
        return (1 - 1 / (1 + s.double())).to(_float(s))

    def prior_std(self) -> float:
        """z_1 = s: at its top level (infinite) a sample is held as y / sigma, of std 1."""
        return 1.0

    def timesteps(self, steps: int) -> torch.Tensor:
        return torch.linspace(self.t_max, self.t_min, steps, dtype=torch.float64)

    def config(self) -> dict[str, Any]:
        return {"kind": "flow", "t_min": self.t_min}
