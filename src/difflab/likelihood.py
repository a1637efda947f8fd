"""Part 4: likelihood in bits per dimension by the probability-flow ODE.

**The ODE.** In VE coordinates (y = z_t / gammabar_t, sigma = sigmabar_t / gammabar_t; see
:mod:`difflab.denoiser`) the probability-flow ODE of every Gaussian process is
dy/dsigma = (y - D(y, sigma)) / sigma. In lambda = log sigma it reads

    dy/dlambda = y - D(y, lambda),     d log p_lambda(y(lambda)) / dlambda = -div (y - D) = d - div_y D,

the second line being the instantaneous change of variables (Chen et al. 2018) for the flow
that carries each marginal p_sigma to the next. Integrating from the data end to the prior end,

    log p(x) = log N(y(sigma_max); 0, prior_std^2 I)
               + int_{log sigma_min}^{log sigma_max} (d - div_y D) dlambda,

with y(sigma_min) = x and d the number of dimensions. The integral runs over the process's own noise range
[sigma_min, sigma_max] (:func:`noise_range`; step t = 1 to T of a discrete schedule): what is computed is
the density of the data smoothed by N(0, sigma_min^2), as in score-SDE's likelihood with its
small t_min. The prior is the process's, ``N(0, prior_std^2)`` in VE coordinates. A process that reaches
pure noise (the flow process, sigma_max = inf) is integrated up to :data:`PURE_NOISE_TOP` instead, where its
marginal is N(0, sigma^2) up to the data's spread (SNR 1e-8 for data of unit std), the prior taken there.

**Method.** Classical fourth-order Runge-Kutta on ``steps`` equal steps in log sigma (4 network
calls, each with its divergence, per step); the image and the log-density change are integrated
together.

**Divergence.** div_y D by Hutchinson's estimator E[e^T (dD/dy) e] with Rademacher (default) or
Gaussian probes e, one vector-Jacobian product per probe; the probes are fixed along a trajectory
(FFJORD) and drawn per sample from the seeds, so an image's value does not depend on its batch.
``exact=True`` sums the diagonal of the Jacobian instead (one backward pass per dimension: for
tests on tiny images).

**Discrete data.** 8-bit pixels k in {0..255} are dequantised uniformly,
x = 2 (k + u) / 256 - 1 = (k + u) / 128 - 1 with u ~ U[0, 1)^d, so the bin of k has width 1/128 in
model units. Jensen's inequality over u gives the variational bound (Theis et al. 2016; Ho et al.
2019)

    log P(k) = log int_{[0,1)^d} p_x((k + u) / 128 - 1) 128^-d du >= E_u[log p_x(x)] - d log 128,

so bits/dim of the discrete data is -E[log p_x(x)] / (d ln 2) + log2(128), i.e. the continuous
bits/dim in model units plus exactly 7 (:data:`DEQUANTIZATION_BITS`); this is an upper bound on
the true bits/dim, estimated with one u per image. (The 127.5 of the training scaling
x = k / 127.5 - 1 is not the bin width: the dequantised bins tile [-1, 1) with width 2/256, so the
correction is log2(128), not log2(127.5).)
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from difflab.errors import UsageError
from difflab.noise import sample_seeds, seeded_normal, seeded_uniform

DEQUANTIZATION_BITS = math.log2(128.0)  # -log2 of the bin width 2/256 of 8-bit data in model units
PROBES = ("rademacher", "gaussian")
PURE_NOISE_TOP = 1e4
_DEQUANT_SALT, _PROBE_SALT = 0x6A09E667, 0x3C6EF372


def divergence(fn: Callable[[torch.Tensor], torch.Tensor], y: torch.Tensor, probes: list[torch.Tensor] | None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(fn(y), div_y fn(y) per sample) for a map fn: [B, ...] -> [B, ...] acting per sample.
    ``probes``: Hutchinson's vectors (the mean of e^T J e over them); None: the exact trace of the
    Jacobian, one backward pass per dimension."""
    with torch.enable_grad():
        y = y.detach().requires_grad_(True)
        out = fn(y)
        if probes is None:
            flat = out.flatten(1)
            dims = flat.shape[1]
            div = torch.zeros(y.shape[0], dtype=out.dtype, device=y.device)
            for i in range(dims):
                g = torch.autograd.grad(flat[:, i].sum(), y, retain_graph=i < dims - 1)[0]
                div = div + g.flatten(1)[:, i]
        else:
            div = torch.zeros(y.shape[0], dtype=out.dtype, device=y.device)
            for j, e in enumerate(probes):
                g = torch.autograd.grad((out * e).sum(), y, retain_graph=j < len(probes) - 1)[0]
                div = div + (g * e).flatten(1).sum(1)
            div = div / len(probes)
    return out.detach(), div.detach()


def noise_range(process) -> tuple[float, float]:
    """(sigma_min, sigma_max) the ODE is integrated over: the process's own range; for a discrete
    schedule the smallest level is that of step t = 1 (t = 0 is the data, never trained on)."""
    if process.discrete:
        return float(process.sigma_ve(torch.tensor(1.0, dtype=torch.float64))), process.sigma_max()
    return process.sigma_min(), min(process.sigma_max(), PURE_NOISE_TOP)


def _probes(seeds: torch.Tensor, like: torch.Tensor, count: int, kind: str) -> list[torch.Tensor]:
    shape = like.shape[1:]
    if kind == "gaussian":
        return [seeded_normal(seeds, 1 + j, shape, like.device).to(like.dtype) for j in range(count)]
    return [torch.where(seeded_uniform(seeds, 1 + j, shape, like.device, salt=_PROBE_SALT) < 0.5, -1.0, 1.0)
            .to(like.dtype) for j in range(count)]


def log_likelihood(denoiser, x: torch.Tensor, *, steps: int = 32, cond: dict | None = None,
                   hutchinson_samples: int = 1, probe: str = "rademacher", exact: bool = False,
                   seeds: torch.Tensor | None = None) -> torch.Tensor:
    """log p(x) in nats per sample ([B], float64) of continuous data x ([B, C, H, W], model units)
    under the probability-flow ODE of ``denoiser`` (see the module docstring). ``seeds`` ([B])
    pick the Hutchinson probes (default 0..B-1); ``exact=True`` uses the exact divergence."""
    if steps < 1:
        raise UsageError(f"--steps must be at least 1, got {steps}")
    if not exact and hutchinson_samples < 1:
        raise UsageError(f"--hutchinson-samples must be at least 1, got {hutchinson_samples}")
    if probe not in PROBES:
        raise UsageError(f"unknown probe '{probe}'; choose one of {', '.join(PROBES)}")
    process = denoiser.process
    lo, hi = noise_range(process)
    if not 0 < lo < hi:
        raise UsageError(f"the likelihood needs a noise range 0 < sigma_min < sigma_max; this process has "
                         f"[{lo:g}, {hi:g}]")
    seeds = torch.arange(x.shape[0]) if seeds is None else torch.as_tensor(seeds)
    probes = None if exact else _probes(seeds, x, hutchinson_samples, probe)
    dims = x[0].numel()
    ones = x.new_ones(x.shape[0])

    def rhs(y: torch.Tensor, lam: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sigma = torch.exp(lam).to(x.dtype) * ones
        d, div = divergence(lambda v: denoiser(v, sigma, cond), y, probes)
        return y - d, dims - div.double()

    lams = torch.linspace(math.log(lo), math.log(hi), steps + 1, dtype=torch.float64)
    y, delta = x, torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
    for i in range(steps):
        lam, h = lams[i], float(lams[i + 1] - lams[i])
        k1, d1 = rhs(y, lam)
        k2, d2 = rhs(y + h / 2 * k1, lam + h / 2)
        k3, d3 = rhs(y + h / 2 * k2, lam + h / 2)
        k4, d4 = rhs(y + h * k3, lam + h)
        y = y + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        delta = delta + h / 6 * (d1 + 2 * d2 + 2 * d3 + d4)
    prior = process.prior_std() if hi == process.sigma_max() else hi
    yf = y.flatten(1).double()
    log_prior = -0.5 * (yf / prior).pow(2).sum(1) - dims * (math.log(prior) + 0.5 * math.log(2 * math.pi))
    return log_prior + delta


def dequantize(images: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
    """uint8 images [B, C, H, W] to x = (k + u) / 128 - 1 in [-1, 1), u ~ U[0, 1) drawn per image
    from ``seeds`` ([B])."""
    u = seeded_uniform(seeds, 0, images.shape[1:], images.device, salt=_DEQUANT_SALT)
    return (images.double() + u.double()) / 128.0 - 1.0


def bits_per_dim(denoiser, images: torch.Tensor, *, steps: int = 32, seed: int = 0,
                 hutchinson_samples: int = 1, probe: str = "rademacher", exact: bool = False,
                 cond_fn: Callable[[slice], dict | None] | None = None, batch_size: int = 64,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 progress: Callable[[int], None] | None = None) -> torch.Tensor:
    """Bits per dimension ([N], float64) of 8-bit images (uint8 [N, C, H, W]) under ``denoiser``:
    -log p of the dequantised image over d ln 2 (d = C H W), plus :data:`DEQUANTIZATION_BITS` (the
    bound of the module docstring). Image j's dequantisation noise and probes depend only on (seed, j), not on
    the batch size. ``cond_fn(slice)`` gives the condition of a batch."""
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise UsageError(f"bits_per_dim takes uint8 images [N, C, H, W], got {images.dtype} "
                         f"{tuple(images.shape)}")
    seeds = sample_seeds(seed, len(images))
    dims = images[0].numel()
    out = []
    for lo in range(0, len(images), batch_size):
        sl = slice(lo, min(len(images), lo + batch_size))
        x = dequantize(images[sl], seeds[sl]).to(device=device, dtype=dtype)
        cond = cond_fn(sl) if cond_fn is not None else None
        logp = log_likelihood(denoiser, x, steps=steps, cond=cond, hutchinson_samples=hutchinson_samples,
                              probe=probe, exact=exact, seeds=seeds[sl])
        out.append((-logp / (dims * math.log(2)) + DEQUANTIZATION_BITS).cpu())
        if progress is not None:
            progress(sl.stop - sl.start)
    return torch.cat(out)
