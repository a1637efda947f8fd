"""Editing a given image with a trained denoiser: SDEdit and RePaint, as pure functions over a denoiser
D(x, sigma, cond) -> x0 and a sampler's grid (VE coordinates, see :mod:`difflab.denoiser`).

SDEdit (Meng et al. 2022) noises the image to a level of the grid and denoises it from there with any
sampler: at ``strength`` s it runs the last round(s K) of the grid's K steps, from y = x + sigma eps. s = 1
is a fresh sample (the image is not used), s = 0 the image itself. Through the probability-flow ODE it is the
ODE's map from the noised image; for Gaussian data N(mu, s0^2) that is mu + (y - mu) s0 / sqrt(s0^2 + sigma^2).

RePaint (Lugmayr et al. 2022) fills a masked region: at every network call the known pixels are replaced by
the original noised to that level, x + sigma eps (fresh eps), so the network sees the whole image as a sample
of its level; the samplers' updates act pixel by pixel, so the region kept is never moved by the sampler's own
values there, and the result is the sampled region pasted into the original. With ``resample`` r > 1, at every
``jump_length``-th level j counted from the clean end the walk goes back up j levels by the forward process,
y' = y + sqrt(sigma'^2 - sigma^2) eps, and down again, r times in all, which lets the filled region agree with
the kept one (the paper's time-travel; the paper's and diffusers' schedule: no jump reaches the grid's top).
"""

from __future__ import annotations

import inspect
import math

import torch
from torch import nn

from difflab.errors import UsageError
from difflab.noise import SeededNoise
from difflab.samplers import SAMPLERS

# what RePaint draws with when not told (Model.edit, difflab edit with a mask): the ancestral sampler, 50 steps, 4
# passes over every 10 (bench/RESULTS.md "Inpainting": the class of MNIST digits kept 0.70 against 0.54 with the
# run's own deterministic sampler and no resampling)
REPAINT_DEFAULTS = {"sampler": "ddpm", "steps": 50, "resample": 4}

# noise streams of one sample (SeededNoise offsets): the sampler's steps of each RePaint pass, the known
# region's noise at each network call, the up-jumps; far apart, so that no two streams share a key
_PASS, _KNOWN, _JUMP = 1 << 12, 1 << 28, 1 << 29


def start_index(steps: int, strength: float) -> int:
    """The grid level SDEdit starts at: it runs the last round(``strength`` ``steps``) of ``steps`` steps."""
    if not 0 <= strength <= 1:  # (False for NaN too)
        raise UsageError(f"--strength must be in [0, 1] (0: the image back, 1: a fresh sample), got {strength}")
    return steps - round(strength * steps)


def start_std(process, sigmas: torch.Tensor) -> float:
    """The std of a fresh sample's starting noise on grid ``sigmas``: the prior's when the grid starts at the
    top of the process, else its first level (as :func:`difflab.samplers.generate` starts)."""
    top = float(sigmas[0])
    return process.prior_std() if top >= process.sigma_max() * 0.999 else top


def _start(denoiser, images: torch.Tensor, sigmas: torch.Tensor, i: int, seeds: torch.Tensor) -> torch.Tensor:
    """Where a draw from grid level ``i`` starts: the image noised to that level, or at level 0 a fresh sample's
    noise (the image unused)."""
    eps = SeededNoise(seeds).initial(images.shape[1:], device=images.device, dtype=images.dtype)
    return eps * start_std(denoiser.process, sigmas) if i == 0 else images + float(sigmas[i]) * eps


@torch.no_grad()
def sdedit(denoiser, images: torch.Tensor, sigmas: torch.Tensor, strength: float, seeds: torch.Tensor, *,
           sampler: str = "ddim", cond: dict | None = None, callback=None, **options) -> torch.Tensor:
    """SDEdit of ``images`` (model units, [B, C, H, W]) on the decreasing grid ``sigmas`` (ending in 0) at
    ``strength``, with ``sampler`` and its ``options``; ``seeds`` [B] are the per-sample seeds (the noise of
    sample j depends only on its seed). Returns model units."""
    i = start_index(len(sigmas) - 1, strength)
    if i == len(sigmas) - 1:
        return images.clone()
    x = _start(denoiser, images, sigmas, i, seeds)
    return SAMPLERS[sampler](denoiser, x, sigmas[i:], cond=cond, noise=SeededNoise(seeds), callback=callback, **options)


class KnownRegion(nn.Module):
    """``denoiser`` called on inputs whose kept pixels (``mask`` 0) are the original ``images`` noised to the
    call's level with fresh seeded noise (RePaint's replacement, made where the network reads it); at an
    infinite level, where samples are held as y / sigma, that is the noise alone."""

    def __init__(self, denoiser, images: torch.Tensor, mask: torch.Tensor, seeds: torch.Tensor):
        super().__init__()
        self.denoiser, self.images, self.mask, self.process = denoiser, images, mask, denoiser.process
        self.noise, self.calls = SeededNoise(seeds, _KNOWN), 0

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: dict | None = None) -> torch.Tensor:
        eps = self.noise(self.calls, x)
        self.calls += 1
        level = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1, *[1] * (x.ndim - 1))
        # at an infinite level (the flow process's t = 1) a sample is held as y / sigma: the noise alone
        known = torch.where(torch.isinf(level), eps, self.images + level * eps)
        return self.denoiser(torch.where(self.mask, x, known), sigma, cond)


@torch.no_grad()
def repaint(denoiser, images: torch.Tensor, mask: torch.Tensor, sigmas: torch.Tensor, seeds: torch.Tensor, *,
            strength: float = 1.0, sampler: str = "ddpm", jump_length: int = 10, resample: int = 1,
            cond: dict | None = None, callback=None, **options) -> torch.Tensor:
    """RePaint: ``images`` (model units, [B, C, H, W]) with the pixels where ``mask`` (bool, broadcastable to
    the images) is True drawn anew, on the grid ``sigmas`` with ``sampler``; the ``jump_length`` steps before
    every ``jump_length``-th level (from the clean end) are redone ``resample`` - 1 more times after a jump back
    up. ``strength`` < 1 starts as SDEdit does, from the image noised to a lower level (the masked region then
    keeps some of the original).
    ``seeds`` [B]: per-sample seeds. Returns model units, the kept pixels exactly the originals."""
    if int(jump_length) != jump_length or jump_length < 1 or int(resample) != resample or resample < 1:
        raise UsageError(f"--jump-length and --resample must be whole numbers >= 1, got {jump_length} and {resample}")
    mask = mask.to(device=images.device, dtype=torch.bool).expand_as(images)
    den = KnownRegion(denoiser, images, mask, seeds)
    jumps, passes = SeededNoise(seeds, _JUMP), 0
    steps = len(sigmas) - 1
    start = level = start_index(steps, strength)

    def walk(x: torch.Tensor, a: int, b: int) -> torch.Tensor:  # grid levels a -> b, one sampler pass
        nonlocal passes
        passes += 1
        return SAMPLERS[sampler](den, x, sigmas[a:b + 1], cond=cond, noise=SeededNoise(seeds, passes * _PASS),
                                 callback=callback, **options)

    x = _start(denoiser, images, sigmas, start, seeds) if start < steps else images
    # the levels where the walk jumps back up: every jump_length-th counted from the clean end, as in the
    # paper's schedule, except where the jump would reach the grid's top (or above the start)
    length = int(jump_length)
    for b in [b for b in range(steps, 0, -length) if b - length >= max(start, 1)][::-1]:
        x = walk(x, level, b)
        for _ in range(int(resample) - 1):
            hi, lo = float(sigmas[b - length]), float(sigmas[b])
            x = walk(x + math.sqrt(hi**2 - lo**2) * jumps(passes, x), b - length, b)
        level = b
    if level < steps:
        x = walk(x, level, steps)
    return torch.where(mask, x, images)


@torch.no_grad()
def edit_images(denoiser, images: torch.Tensor, sigmas: torch.Tensor, seeds: torch.Tensor, *, strength: float,
                mask: torch.Tensor | None = None, sampler: str = "ddim", cond_fn=None, batch_size: int = 64,
                jump_length: int = 10, resample: int = 1, **options) -> torch.Tensor:
    """:func:`sdedit`, or with a ``mask`` [N or 1, 1 or C, H, W] (True: repaint) :func:`repaint`, batch by batch:
    images and results in model units, ``seeds`` [N] per image, ``cond_fn(slice)`` a batch's condition."""
    unknown = [k for k in options if k not in inspect.signature(SAMPLERS[sampler]).parameters]
    if unknown:
        raise UsageError(f"sampler '{sampler}' takes no option {', '.join(unknown)}")
    out = []
    for lo in range(0, len(images), batch_size):
        sl = slice(lo, min(len(images), lo + batch_size))
        cond = cond_fn(sl) if cond_fn is not None else None
        if mask is None:
            out.append(sdedit(denoiser, images[sl], sigmas, strength, seeds[sl], sampler=sampler, cond=cond, **options))
        else:
            m = mask[sl] if len(mask) > 1 else mask
            out.append(repaint(denoiser, images[sl], m, sigmas, seeds[sl], strength=strength, sampler=sampler,
                               jump_length=jump_length, resample=resample, cond=cond, **options))
    return torch.cat(out)
