"""Part 5: guidance, as wrappers with the canonical call D(x, sigma, cond) -> x0_hat.

Convention (printed by ``difflab sample --help``): the guidance scale g multiplies the
conditional direction, f_hat = f(z, null) + g (f(z, c) - f(z, null)), so g = 1 + w with w
the weight of Ho & Salimans; g = 1 is plain conditional sampling and g = 0 unconditional.
Because x0_hat = y - sigma f is affine in the noise estimate f, mixing x0 estimates with
the same weights is the same rule.
"""

from __future__ import annotations

import torch
from torch import nn


def _cat_cond(a: dict | None, b: dict | None) -> dict | None:
    if a is None:
        return None
    return {k: torch.cat([a[k], b[k]]) for k in a}


class ClassifierFreeGuidance(nn.Module):
    """f_hat = f(z, null) + g (f(z, c) - f(z, null)), both passes batched into one forward call."""

    def __init__(self, denoiser, null_cond: dict, scale: float):
        super().__init__()
        self.denoiser, self.null_cond, self.scale = denoiser, null_cond, float(scale)
        self.process = denoiser.process

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: dict | None = None) -> torch.Tensor:
        if self.scale == 1.0:  # exactly plain conditional sampling, at half the cost
            return self.denoiser(x, sigma, cond)
        null = {k: v[: x.shape[0]] for k, v in self.null_cond.items()}
        both = self.denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), _cat_cond(cond, null))
        x0_c, x0_u = both.chunk(2)
        return x0_u + self.scale * (x0_c - x0_u)
