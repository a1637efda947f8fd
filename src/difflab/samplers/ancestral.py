"""DDPM ancestral sampling and DDIM (part 3 and part 4 of the series), in VE coordinates.

With y = z / gammabar and sigma = sigmabar / gammabar the DDIM update
z_{t'} = gammabar_{t'} x_hat + sqrt(sigmabar_{t'}^2 - c^2) f + c s becomes
y' = x_hat + sqrt(sigma'^2 - c^2) eps_hat + c s with c = eta sigma' sqrt(sigma^2 - sigma'^2) / sigma,
which is the same for every Gaussian process. eta = 1 on every step is DDPM's
ancestral sampler with the "small" posterior variance. Both step exactly from an infinite level
(the flow process's t = 1, the sample held as y / sigma): there y' = x_hat + sigma' s_hat (DDIM) and
y' = x_hat + sigma' s_fresh (DDPM), the limits of their updates.
"""

from __future__ import annotations

import math

import torch

from difflab.errors import UsageError
from difflab.samplers.steps import levels, noise_estimate, per_sample, step_noise


@torch.no_grad()
def sample_ddim(denoiser, x, sigmas, *, cond=None, noise=None, callback=None, eta: float = 0.0,
                landing=None):
    """DDIM: x_hat from the model, then renoise to the next level reusing the predicted noise.
    eta = 0 is deterministic (the probability-flow ODE's Euler step); eta = 1 is DDPM.
    ``landing`` [(level, scale)] per step, for loops that are not a grid (diffusers' DDIM with linspace
    spacing): step i renoises to ``level`` and multiplies by ``scale``, and the next step reads the result
    as a sample of the next level of ``sigmas``."""
    sig = levels(sigmas)
    for i in range(len(sig) - 1):
        s, s_next = sig[i], sig[i + 1]
        s_land, scale = landing[i] if landing is not None else (s_next, 1.0)
        x0 = denoiser(x, per_sample(s, x), cond)
        eps = noise_estimate(x, x0, s)
        c = eta * s_land * math.sqrt(max(1 - (s_land / s) ** 2, 0.0))
        x = x0 + math.sqrt(max(s_land**2 - c**2, 0.0)) * eps
        if eta > 0 and s_land > 0:
            x = x + c * step_noise(noise, i, x)
        x = x * scale if scale != 1.0 else x
        if callback is not None:
            callback({"i": i, "x": x, "sigma": s, "x0": x0})
    return x


@torch.no_grad()
def sample_ddpm(denoiser, x, sigmas, *, cond=None, noise=None, callback=None, variance: str = "small"):
    """Ancestral sampling: z_{t-1} ~ N(mu_tilde(z_t, x_hat), tau_t), tau_t = sigma_tilde_t^2 ("small")
    or beta_t ("large", VP processes only). The last step returns the mean (x_hat)."""
    if variance not in ("small", "large"):
        raise UsageError(f"variance must be 'small' or 'large', got '{variance}'")
    if variance == "large" and not denoiser.process.variance_preserving:
        raise UsageError("the 'large' DDPM variance (tau = beta) is defined for variance-preserving processes")
    sig = levels(sigmas)
    for i in range(len(sig) - 1):
        s, s_next = sig[i], sig[i + 1]
        x0 = denoiser(x, per_sample(s, x), cond)
        # posterior q(y' | y, x_hat): the same in every parameterisation of time
        x = x0 + (s_next**2 / s**2) * (x - x0)
        if s_next > 0:
            if variance == "small":
                var = s_next**2 * (1 - (s_next / s) ** 2)
            else:  # beta of the (respaced) step, (1 - gammabar_t^2 / gammabar_t'^2), in VE units
                var = (s**2 - s_next**2) * (1 + s_next**2) / (1 + s**2)
            x = x + math.sqrt(var) * step_noise(noise, i, x)
        if callback is not None:
            callback({"i": i, "x": x, "sigma": s, "x0": x0})
    return x
