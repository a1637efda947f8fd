"""Samplers: short pure functions with one signature,

    sample_NAME(denoiser, x, sigmas, *, cond=None, noise=None, callback=None, **options) -> x0

over a decreasing grid of noise levels ``sigmas`` ending in 0 (VE coordinates;
see :mod:`difflab.denoiser`). Respacing is only a different grid: the samplers
never change. :func:`generate` is the convenience that builds the grid and the
starting noise from per-sample seeds and runs one sampler in batches.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence

import torch

from difflab import threads
from difflab.errors import UsageError
from difflab.noise import SeededNoise, sample_seeds
from difflab.processes.gaussian import GaussianProcess
from difflab.samplers.ancestral import sample_ddim, sample_ddpm
from difflab.samplers.consistency import sample_consistency
from difflab.samplers.multistep import (
    sample_dpmpp_2m,
    sample_dpmpp_2m_sde,
    sample_dpmpp_3m,
    sample_dpmpp_3m_full,
    sample_dpmpp_3m_sde,
    sample_dpmpp_3m_sde_full,
    sample_unipc,
)
from difflab.samplers.ode import sample_euler, sample_heun
from difflab.samplers.sde import sample_euler_maruyama, sample_langevin, sample_pc

SAMPLERS: dict[str, Callable] = {
    "ddpm": sample_ddpm,
    "ddim": sample_ddim,
    "euler": sample_euler,
    "heun": sample_heun,
    "dpmpp-2m": sample_dpmpp_2m,
    "dpmpp-3m": sample_dpmpp_3m,
    "dpmpp-2m-sde": sample_dpmpp_2m_sde,
    "dpmpp-3m-sde": sample_dpmpp_3m_sde,
    "dpmpp-3m-full": sample_dpmpp_3m_full,
    "dpmpp-3m-sde-full": sample_dpmpp_3m_sde_full,
    "unipc": sample_unipc,
    "sde": sample_euler_maruyama,
    "pc": sample_pc,
    "langevin": sample_langevin,
}
# the samplers of a consistency function f(x, sigma) (a consistency-tuned run, samplers/consistency.py), one network
# evaluation a step; kept out of SAMPLERS, the samplers of a denoiser: driven by a posterior mean, their draws are
# too narrow (on Gaussian data 0.32 for 0.5 in 30 steps)
CONSISTENCY_SAMPLERS: dict[str, Callable] = {"consistency": sample_consistency}
SPACINGS = ("uniform", "karras", "geometric")  # the grids of sampler_sigmas
# the grid each sampler uses unless told otherwise (EDM's solvers were designed for Karras levels; the
# newer multistep solvers are far more accurate on levels uniform in lambda = -log sigma, measured on
# Gaussian data in tests/test_fewstep_samplers.py: DPM-Solver's and UniPC's "logSNR" grid)
DEFAULT_SPACING = {"heun": "karras", "euler": "karras", "dpmpp-2m": "karras", "langevin": "geometric",
                   "consistency": "karras",  # 2 levels: [sigma_max, the grid bottom], the intermediate level
                   **{name: "geometric" for name in ("dpmpp-3m", "dpmpp-2m-sde", "dpmpp-3m-sde", "unipc",
                                                             "dpmpp-3m-full", "dpmpp-3m-sde-full")}}


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """EDM's noise levels: sigma_i = (s_max^(1/rho) + i/(n-1) (s_min^(1/rho) - s_max^(1/rho)))^rho, then 0."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return torch.cat([(hi + ramp * (lo - hi)) ** rho, torch.zeros(1, dtype=torch.float64)])


# The top of the karras and geometric grids: EDM's sigma_max (SNR 1.6e-4). Above it the data is invisible
# under the noise, and a VP schedule reaches far higher (the cosine schedule's t = T is sigma ~ 2e4): a
# 10-step grid starting there spends half its steps on pure noise. Measured on an MNIST run (1,170 steps,
# DPM-Solver++(2M), 10 steps, 256 samples): 0.47 of samples confident from sigma_max = 2e4, 0.59 from 80,
# the same as 20 steps (bench/RESULTS.md, "Defaults").
SIGMA_TOP = 80.0


def get_sigmas(process: GaussianProcess, steps: int, spacing: str = "uniform",
               sigma_min: float | None = None) -> torch.Tensor:
    """A grid of ``steps`` noise levels (float64) followed by 0. ``uniform`` spaces the process's own
    time evenly (integer steps for discrete models, respaced); ``karras`` uses EDM's levels between
    the process's smallest and largest noise level, at most ``SIGMA_TOP``; ``geometric`` is NCSN's
    log-uniform grid (the same top). ``sigma_min`` raises the bottom of the karras and geometric grids
    (the last step denoises from there; the uniform grid keeps the process's own times)."""
    if steps < 1:
        raise UsageError(f"--steps must be at least 1, got {steps}")
    if sigma_min is not None and not 0 <= sigma_min < SIGMA_TOP:
        raise UsageError(f"--sigma-min must be in [0, {SIGMA_TOP:g}), got {sigma_min}")
    floor = sigma_min or 0.0
    if spacing == "uniform":
        ts = process.timesteps(steps)
        return torch.cat([process.sigma_ve(ts).double(), torch.zeros(1, dtype=torch.float64)])
    if spacing == "karras":
        top = min(process.sigma_max(), SIGMA_TOP)
        if steps == 1:
            return torch.tensor([top, 0.0], dtype=torch.float64)
        return karras_sigmas(steps, max(process.sigma_min(), 1e-3, floor), top)
    if spacing == "geometric":  # NCSN's levels, down to 0.01 at the smallest
        lo, hi = max(process.sigma_min(), 0.01, floor), min(process.sigma_max(), SIGMA_TOP)
        return torch.cat([torch.logspace(math.log10(hi), math.log10(lo), steps, dtype=torch.float64),
                          torch.zeros(1, dtype=torch.float64)])
    raise UsageError(f"unknown --spacing '{spacing}'; choose {', '.join(SPACINGS)}")


# the samplers that step exactly from an infinite level (the flow process's t = 1, where the uniform grid
# starts): the others' updates (multistep differences in log sigma, SDE increments) have no finite limit there
FROM_PURE_NOISE = ("ddpm", "ddim", "euler", "heun")


def sampler_sigmas(process: GaussianProcess, sampler: str, steps: int, spacing: str | None = None,
                   sigma_min: float | None = None) -> torch.Tensor:
    """The grid ``sampler`` steps through: ``spacing`` or the sampler's own (:data:`DEFAULT_SPACING`).
    A grid from an infinite level starts, for a sampler not in :data:`FROM_PURE_NOISE`, at the largest
    finite level instead: ``SIGMA_TOP`` in place of the infinite one (the same number of levels) when the
    next level is below it, else the grid of one more level without its first; :func:`generate` starts
    there from N(0, sigma^2), the data's spread neglected (SNR at most 1.6e-4) as for VE processes."""
    spacing = spacing or DEFAULT_SPACING.get(sampler, "uniform")
    sigmas = get_sigmas(process, steps, spacing, sigma_min)
    if math.isinf(float(sigmas[0])) and sampler not in FROM_PURE_NOISE:
        if len(sigmas) > 2 and float(sigmas[1]) >= SIGMA_TOP:
            return get_sigmas(process, steps + 1, spacing, sigma_min)[1:]
        sigmas = sigmas.clone()
        sigmas[0] = SIGMA_TOP
    return sigmas


def _once_per_level(steps: int, options: dict) -> int:
    return steps


# network evaluations of each sampler for a grid of ``steps`` levels (its options: the corrector's and
# Langevin's inner steps); the samplers of ``_once_per_level`` call the network once at each level of the
# grid and nowhere else, so a call limited to some levels (autoguidance's guide) is counted on the grid
EVALUATIONS: dict[str, Callable[[int, dict], int]] = {
    **{name: _once_per_level for name in SAMPLERS},
    "heun": lambda steps, options: 2 * steps - 1,  # a second evaluation at every level but the last step's 0
    "pc": lambda steps, options: steps + (steps - 1) * options.get("corrector_steps", 1),
    "langevin": lambda steps, options: steps * options.get("steps_per_level", 10) + 1,
}


def evaluations(sampler: str, steps: int, **options) -> int:
    """Number of network evaluations a sampler makes for a grid of ``steps`` levels."""
    return EVALUATIONS[sampler](steps, options)


def evaluates_on_grid(sampler: str) -> bool:
    """Whether ``sampler`` calls the network once at each level of its grid and nowhere else."""
    return EVALUATIONS[sampler] is _once_per_level


@torch.no_grad()
def generate(
    denoiser,
    n: int,
    shape: Sequence[int],
    *,
    seed: int = 0,
    sampler: str = "ddim",
    steps: int = 50,
    spacing: str | None = None,
    cond_fn: Callable[[slice], dict] | None = None,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    start: int = 0,
    init_noise: torch.Tensor | None = None,
    callback: Callable | None = None,
    progress: Callable[[float], None] | None = None,
    sigmas: torch.Tensor | None = None,
    prior: float | None = None,
    sigma_min: float | None = None,
    **options,
) -> torch.Tensor:
    """Draw ``n`` samples of ``shape`` (C, H, W) with per-sample seeds (sample j of ``--seed s`` is the
    same for any batch size or rank). ``cond_fn(slice)`` gives the conditioning of a batch.
    ``init_noise`` ([n, C, H, W] standard normal) replaces the seeded starting noise.
    ``sigmas`` and ``prior`` (the starting std in VE units) replace the grid of ``steps``/``spacing``
    (a diffusers scheduler's grid, :mod:`difflab.interop.schedulers`); ``sigma_min`` raises the grid's
    bottom (:func:`get_sigmas`). ``progress(k)`` is told after
    every sampler step, k = the images of that step / the steps (so a whole run adds up to n).
    Returns float samples in model units (about [-1, 1]) on the CPU."""
    samplers = {**SAMPLERS, **CONSISTENCY_SAMPLERS}
    if sampler not in samplers:
        raise UsageError(f"unknown sampler '{sampler}'; choose one of {', '.join(SAMPLERS)}")
    unknown = [k for k in options if k not in inspect.signature(samplers[sampler]).parameters]
    if unknown:
        raise UsageError(f"sampler '{sampler}' takes no option {', '.join(unknown)}")
    if sigmas is None:
        sigmas = sampler_sigmas(denoiser.process, sampler, steps, spacing, sigma_min)
    # start from the prior when the grid starts at the top (at an infinite level, y / sigma ~ N(0, I)),
    # else at its first level
    if prior is None:
        prior = denoiser.process.prior_std() if float(sigmas[0]) >= denoiser.process.sigma_max() * 0.999 \
            else float(sigmas[0])
    n_steps = len(sigmas) - 1
    sigmas = sigmas.to(device=device, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    seeds = sample_seeds(seed, n, start)

    def draw(lo: int, hi: int, cond) -> torch.Tensor:
        noise = SeededNoise(seeds[lo:hi])
        if init_noise is not None:
            x = init_noise[lo:hi].to(device=device, dtype=dtype)
        else:
            x = noise.initial(shape, device=device, dtype=dtype)
        x = x * prior

        def step_done(info: dict) -> None:
            if callback is not None:
                callback(info)
            if progress is not None:
                progress((hi - lo) / n_steps)

        step_cb = step_done if (callback is not None or progress is not None) else None
        return samplers[sampler](denoiser, x, sigmas, cond=cond, noise=noise, callback=step_cb,
                                 **options).float().cpu()

    out = []
    for lo in range(0, n, batch_size):
        hi = min(n, lo + batch_size)
        # on a CPU, parts of the batch run side by side (per-sample seeds: the same samples either way);
        # a callback sees whole batches, so it keeps them whole
        parts = threads.cpu_split(lo, hi, device) if callback is None else [(lo, hi)]
        # conditioning is made here, one part after another: cond_fn need not be thread-safe (a prompt
        # cache that encodes a new prompt is not)
        conds = [cond_fn(slice(a, b)) if cond_fn is not None else None for a, b in parts]
        out.extend(threads.run_split(draw, [(a, b, c) for (a, b), c in zip(parts, conds)]))
    return torch.cat(out)
