"""Exact models for Gaussian data, where the score is known in closed form.

If x ~ N(mu, s0^2 I) then z_t = gammabar x + sigmabar s is Gaussian too, and in VE
coordinates E[x | y] = (s0^2 y + sigma^2 mu) / (s0^2 + sigma^2). The network below
returns the exact noise prediction, so every sampler, guidance rule and the
likelihood can be checked against the analytic answer.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from difflab.broadcast import broadcast_to_batch
from difflab.processes.gaussian import GaussianProcess


class GaussianDataNet(nn.Module):
    """The exact eps-prediction network for data x ~ N(mean, std^2 I) under ``process`` (``prediction="velocity"``:
    the flow process's velocity eps - x0, finite at its t = 1 where the signal scale is 0).

    With ``num_classes`` the class c has mean ``mean + class_shift * c`` (for guidance tests);
    the null class (``num_classes``) is the mixture's nearest Gaussian fit (mean of the means)."""

    def __init__(self, process: GaussianProcess, mean: float = 0.0, std: float = 1.0,
                 num_classes: int = 0, class_shift: float = 0.0, prediction: str = "eps"):
        super().__init__()
        if prediction not in ("eps", "velocity"):
            raise ValueError(f"GaussianDataNet predicts eps or velocity, not {prediction}")
        self.process, self.mean, self.std, self.prediction = process, mean, std, prediction
        self.num_classes, self.class_shift = num_classes, class_shift
        self.config = {"kind": "analytic", "mean": mean, "std": std}

    def _mean(self, x: torch.Tensor, class_labels) -> torch.Tensor:
        if class_labels is None or self.num_classes == 0:
            return torch.full((x.shape[0],), self.mean, dtype=torch.float64, device=x.device)
        c = class_labels.to(torch.float64)
        null = class_labels == self.num_classes
        m = self.mean + self.class_shift * c
        return torch.where(null, self.mean + self.class_shift * (self.num_classes - 1) / 2, m)

    def forward(self, z, t, class_labels=None, context=None, context_mask=None):
        tt = t.double() if self.process.discrete else t.double() / 1000.0
        a, s = self.process.signal_scale(tt).double(), self.process.noise_scale(tt).double()
        # the posterior mean of x in z's coordinates (finite where a = 0, the flow process's t = 1), then eps
        a, s, mu = (broadcast_to_batch(v, z).double() for v in (a, s, self._mean(z, class_labels)))
        x0 = mu + a * self.std**2 * (z.double() - a * mu) / (a**2 * self.std**2 + s**2)
        eps = (z.double() - a * x0) / s
        return (eps - x0 if self.prediction == "velocity" else eps).to(z.dtype)


def gaussian_bpd(mean: float, std: float, x: torch.Tensor) -> float:
    """Exact bits per dimension of continuous data x under N(mean, std^2) (no dequantisation)."""
    nll = 0.5 * ((x.double() - mean) / std) ** 2 + math.log(std) + 0.5 * math.log(2 * math.pi)
    return float(nll.mean() / math.log(2))
