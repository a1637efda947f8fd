"""Samplers of the reverse-time SDE and score-only samplers (parts 4 and 5).

For variance-preserving processes the reverse SDE dz = [f z - g^2 score] dt + g dW is stepped in
the process's own coordinates z = gammabar y, where its variance stays bounded, with f and g^2 from
:func:`~difflab.processes.continuous.sde_coefficients`. For VE processes, in the variance-time
u = sigma^2 the forward process is dy = dW_u, so the reverse SDE is dy = -score du + dW_u with
score = (D - y) / sigma^2. Euler-Maruyama is a many-step method: with few large steps it adds more
noise than it removes (use ddpm/ddim/heun there).
"""

from __future__ import annotations

import math

import torch

from difflab.processes.continuous import sde_coefficients
from difflab.samplers.steps import levels, per_sample, step_noise


def _reverse_step(process, x, x0, s: float, s_next: float, n):
    """One Euler-Maruyama step of the reverse SDE from noise level s to s_next (VE coordinates in/out)."""
    if not process.variance_preserving:
        du = s**2 - s_next**2
        return x + du * (x0 - x) / s**2 + math.sqrt(du) * n
    t, t_next = process.t_of(torch.tensor([s, s_next], dtype=torch.float64)).tolist()
    f, g2 = (float(v) for v in sde_coefficients(process, torch.tensor(t, dtype=torch.float64)))
    a, a_next = (float(v) for v in process.signal_scale(torch.tensor([t, t_next], dtype=torch.float64)))
    z = a * x
    score = (a * x0 - z) / (a * s) ** 2  # grad log p(z_t) = -(z - gammabar x0) / sigmabar^2
    dt = t - t_next
    z = z - (f * z - g2 * score) * dt + math.sqrt(max(g2 * dt, 0.0)) * n
    return z / a_next


@torch.no_grad()
def sample_euler_maruyama(denoiser, x, sigmas, *, cond=None, noise=None, callback=None):
    """Euler-Maruyama on the reverse SDE (see the module docstring for the coordinates)."""
    sig = levels(sigmas)
    for i in range(len(sig) - 1):
        s, s_next = sig[i], sig[i + 1]
        x0 = denoiser(x, per_sample(s, x), cond)
        if s_next == 0:
            x = x0  # the last step lands on the denoised mean (Tweedie), as score-SDE does
        else:
            x = _reverse_step(denoiser.process, x, x0, s, s_next, step_noise(noise, 2 * i, x))
        if callback is not None:
            callback({"i": i, "x": x, "sigma": s, "x0": x0})
    return x


def langevin_step_size(s: float, snr: float) -> float:
    """The corrector's step at noise level s for a target signal-to-noise ratio: Song et al.'s
    eps = 2 (snr |z| / |score|)^2 with the norms' expected values, |z| ~ sqrt(d) and
    |score| ~ sqrt(d) / s (the score of the noise, (D - y) / s^2 with |y - D| ~ s sqrt(d); the Fisher
    information of p_s is at most d / s^2), so eps = 2 (snr s)^2. score_sde takes the norms' batch
    means, which makes a sample depend on its batch; per-sample norms make eps random where d is
    small (a ratio of chi-square draws) and big steps land on the samples nearest the mode, which
    widens the distribution (std 0.90 instead of 0.60 for 4-dimensional Gaussian data)."""
    return 2 * (snr * s) ** 2


def _langevin(denoiser, x, s, cond, n, snr, noise, key):
    """n Langevin corrector steps at noise level s (step size: :func:`langevin_step_size`)."""
    step = langevin_step_size(s, snr)
    for j in range(n):
        score = (denoiser(x, per_sample(s, x), cond) - x) / s**2
        x = x + step * score + math.sqrt(2 * step) * step_noise(noise, key + j, x)
    return x


@torch.no_grad()
def sample_pc(denoiser, x, sigmas, *, cond=None, noise=None, callback=None,
              corrector_steps: int = 1, snr: float = 0.16):
    """Predictor-corrector: a reverse-SDE (Euler-Maruyama) predictor followed by Langevin corrector
    steps at the new noise level (Song et al. 2021). Noise keys: predictor 2i, corrector 2i+1+..."""
    stride = 2 + corrector_steps
    sig = levels(sigmas)
    for i in range(len(sig) - 1):
        s, s_next = sig[i], sig[i + 1]
        x0 = denoiser(x, per_sample(s, x), cond)
        if s_next == 0:
            x = x0
        else:
            x = _reverse_step(denoiser.process, x, x0, s, s_next, step_noise(noise, stride * i, x))
            x = _langevin(denoiser, x, s_next, cond, corrector_steps, snr, noise, stride * i + 1)
        if callback is not None:
            callback({"i": i, "x": x, "sigma": s, "x0": x0})
    return x


@torch.no_grad()
def sample_langevin(denoiser, x, sigmas, *, cond=None, noise=None, callback=None,
                    steps_per_level: int = 10, step_scale: float = 2e-5):
    """Annealed Langevin dynamics (Song & Ermon 2019): uses only the score. At each level sigma_i,
    ``steps_per_level`` steps y <- y + a score + sqrt(2 a) s with a = step_scale sigma_i^2 / sigma_L^2."""
    positive = [s for s in levels(sigmas) if s > 0]
    s_last = positive[-1]
    for i, s in enumerate(positive):
        a = step_scale * s**2 / s_last**2
        for j in range(steps_per_level):
            score = (denoiser(x, per_sample(s, x), cond) - x) / s**2
            x = x + a * score + math.sqrt(2 * a) * step_noise(noise, i * steps_per_level + j, x)
        if callback is not None:
            callback({"i": i, "x": x, "sigma": s, "x0": x + s**2 * score})
    # Tweedie's denoising of the last level: the noise of sigma_L is removed, as NCSN does
    return denoiser(x, per_sample(s_last, x), cond)
