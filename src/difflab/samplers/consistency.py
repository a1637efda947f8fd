"""Consistency models (Song et al. 2023; ECT, Geng et al. 2025): a function f(x, sigma) that maps any point of a
probability-flow ODE trajectory to the trajectory's end at sigma = 0, and the multistep sampler that uses it.

In difflab a consistency function is a denoiser D(x, sigma) (:mod:`difflab.denoiser`): its parameterisation is
already c_skip(sigma) x + c_out(sigma) F(x, sigma), so a trained run's x0 estimate *is* a consistency function
(an inexact one: tuning makes it exact, :mod:`difflab.methods.consistency`). The boundary condition
f(x, 0) = x is imposed by :func:`consistency_function`; every parameterisation but ``x0`` meets it by itself.
"""

from __future__ import annotations

import torch

from difflab.samplers.steps import levels, per_sample, step_noise


def consistency_function(denoiser, x: torch.Tensor, sigma: torch.Tensor, cond=None) -> torch.Tensor:
    """f(x, sigma) of a denoiser taken as a consistency model: its x0 estimate, and x itself where sigma = 0
    (the boundary condition; ``sigma`` per sample, [B])."""
    sigma = torch.as_tensor(sigma, device=x.device).reshape(-1).expand(x.shape[0])
    at_zero = sigma <= 0
    if bool(at_zero.all()):
        return x
    return torch.where(at_zero.view(-1, *[1] * (x.dim() - 1)), x, denoiser(x, sigma.clamp_min(1e-30), cond))


@torch.no_grad()
def sample_consistency(denoiser, x, sigmas, *, cond=None, noise=None, callback=None):
    """Multistep consistency sampling (Song et al. 2023, Algorithm 1): at each level of the grid, jump to the
    trajectory's end with f, then noise that estimate afresh to the next level (one evaluation per level; the
    grid [sigma_max, 0] is one step, [sigma_max, sigma_mid, 0] two)."""
    sigmas = levels(sigmas)
    for i in range(len(sigmas) - 1):
        x0 = denoiser(x, per_sample(sigmas[i], x), cond)
        nxt = sigmas[i + 1]
        x = x0 + nxt * step_noise(noise, i, x) if nxt > 0 else x0
        if callback is not None:
            callback({"i": i, "x": x, "sigma": sigmas[i], "x0": x0})
    return x
