"""Solvers of the probability-flow ODE dy/dsigma = (y - D(y, sigma)) / sigma (part 4).

Euler and Heun follow EDM's Algorithm 2 (with optional churn, which makes them
stochastic). From an infinite level (the flow process's t = 1, the sample held as y / sigma) the
step is Euler's limit y' = x_hat + sigma' (y / sigma), DDIM's: no churn there, and Heun adds no
correction. The multistep solvers in lambda = -log sigma (DPM-Solver++, UniPC) are in
:mod:`difflab.samplers.multistep`. Euler on the ODE, DDIM with eta = 0 and DPM-Solver++ of
order 1 are the same update.
"""

from __future__ import annotations

import math

import torch

from difflab.samplers.steps import levels, noise_estimate, per_sample, step_noise


def _heun_family(denoiser, x, sigmas, cond, noise, callback, second_order, churn, s_tmin, s_tmax, s_noise):
    sigmas = levels(sigmas)
    n = len(sigmas) - 1
    for i in range(n):
        s = sigmas[i]
        gamma = min(churn / n, math.sqrt(2) - 1) if (churn > 0 and s_tmin <= s <= s_tmax and not math.isinf(s)) else 0.0
        s_hat = s * (1 + gamma)
        if gamma > 0:
            x = x + math.sqrt(s_hat**2 - s**2) * s_noise * step_noise(noise, i, x)
        x0 = denoiser(x, per_sample(s_hat, x), cond)
        d = noise_estimate(x, x0, s_hat)
        if math.isinf(s_hat):
            x_next = x0 + sigmas[i + 1] * d
        else:
            x_next = x + (sigmas[i + 1] - s_hat) * d
        if second_order and sigmas[i + 1] > 0 and not math.isinf(s_hat):
            d2 = (x_next - denoiser(x_next, per_sample(sigmas[i + 1], x), cond)) / sigmas[i + 1]
            x_next = x + (sigmas[i + 1] - s_hat) * (d + d2) / 2
        x = x_next
        if callback is not None:
            callback({"i": i, "x": x, "sigma": s, "x0": x0})
    return x


@torch.no_grad()
def sample_euler(denoiser, x, sigmas, *, cond=None, noise=None, callback=None,
                 churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0):
    """Euler steps on the probability-flow ODE (with EDM's churn when churn > 0)."""
    return _heun_family(denoiser, x, sigmas, cond, noise, callback, False, churn, s_tmin, s_tmax, s_noise)


@torch.no_grad()
def sample_heun(denoiser, x, sigmas, *, cond=None, noise=None, callback=None,
                churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0):
    """EDM's Algorithm 2: Heun's second-order method, Euler on the last step (2K - 1 evaluations)."""
    return _heun_family(denoiser, x, sigmas, cond, noise, callback, True, churn, s_tmin, s_tmax, s_noise)
