"""Part 4: deterministic DDIM as an encoder. Invert images to latents, reconstruct them, and
interpolate between latents along great circles (slerp).

Every Gaussian process is the same process in the VE coordinates y = z_t / gammabar_t with noise
level sigma = sigmabar_t / gammabar_t (see :mod:`difflab.denoiser`), so the encoder is written
once, there. A DDIM step (eta = 0) down from sigma' to sigma is

    y = y' + (sigma - sigma') eps(y', sigma'),    eps(y, sigma) = (y - D(y, sigma)) / sigma,

an Euler step of the probability-flow ODE. :func:`invert` takes the Euler step the other way,
y' = y + (sigma' - sigma) eps(y, sigma), reading the noise at the point and level it knows, where
the network sees an input like those it was trained on (reading it at (y, sigma') instead, as
diffusers' DDIMInverseScheduler does, feeds the network a far too clean input on the big steps
near sigma_max of cosine schedules; it reconstructed a trained MNIST model ~25 dB worse). Only
the first step, from the clean image (sigma = 0), reads the noise at sigma'. Sampler and encoder
steps differ by O((sigma' - sigma)^2), so inversion followed by reconstruction is exact in the
limit of many steps; with ``refine`` fixed-point iterations, y' = y + (sigma' - sigma)
eps(y', sigma') is solved for y' and the round trip is exact on any grid (when the iteration
converges: fast at low noise, slowly where sigma' >> sigma).

The latent is z_T of the series, the noisy image at the largest noise level, returned in the
prior's standard-normal units: latent = y_T / prior_std, where the prior in VE coordinates is
N(0, prior_std^2 I) (``process.prior_std()``: sqrt(sigma_max^2 + 1) for VP processes,
sigma_max for VE). So a latent is what ``difflab sample --init-noise`` and
``difflab.samplers.generate(init_noise=...)`` take: the DDIM sampler on the same grid maps it
back to the image. On a grid that reaches pure noise (the flow process's t = 1, sigma = inf) the
last step lands on the sample held as y / sigma (:mod:`difflab.samplers`): its limit is the noise
estimate eps(y, sigma) (refined: the u that solves y = D(u, inf) + sigma u), and the prior's std is 1.
"""

from __future__ import annotations

import math

import torch

from difflab.broadcast import broadcast_to_batch
from difflab.samplers import SAMPLERS, get_sigmas


def _grid(denoiser, steps: int, spacing: str, like: torch.Tensor) -> torch.Tensor:
    """The sampler's decreasing grid (sigma_max, ..., 0) in ``like``'s dtype and device. Every
    spacing starts at sigma_max, so the latent scale is always the prior's std."""
    dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
    return get_sigmas(denoiser.process, steps, spacing).to(device=like.device, dtype=dtype)


@torch.no_grad()
def invert(denoiser, x0: torch.Tensor, steps: int, cond: dict | None = None, *, spacing: str = "uniform",
           refine: int = 0) -> torch.Tensor:
    """DDIM inversion: clean images x0 ([B, C, H, W], model units) to latents z_T in the prior's
    standard-normal units (feed them to :func:`reconstruct` or ``generate(init_noise=...)``).

    Runs the deterministic DDIM update (eta = 0) towards higher noise over the reversed grid of
    ``get_sigmas(process, steps, spacing)``, from sigma = 0 up to sigma_max. ``refine`` > 0 solves
    each step implicitly by that many fixed-point iterations (one network call each), making
    reconstruction on the same grid exact when the iteration converges."""
    up = _grid(denoiser, steps, spacing, x0).flip(0)
    x = x0
    ones = x.new_ones(x.shape[0])
    for i in range(len(up) - 1):
        s, s_next = up[i], up[i + 1]
        # the explicit step reads the noise at the point and level it knows (the very first step,
        # from the clean image, at the level it steps to); each refinement at (x_next, s_next)
        level = s if s > 0 else s_next
        if math.isinf(s_next) and s > 0:  # to pure noise: the limit of y' / sigma' (module docstring)
            x_next = (x - denoiser(x, s * ones, cond)) / s
            for _ in range(refine):
                x_next = (x - denoiser(x_next, s_next * ones, cond)) / s
        else:
            x_next = x + (s_next - s) * (x - denoiser(x, level * ones, cond)) / level
            for _ in range(refine):
                x_next = x + (s_next - s) * (x_next - denoiser(x_next, s_next * ones, cond)) / s_next
        x = x_next
    return x / denoiser.process.prior_std()


@torch.no_grad()
def reconstruct(denoiser, latent: torch.Tensor, steps: int, cond: dict | None = None, *,
                spacing: str = "uniform") -> torch.Tensor:
    """Deterministic DDIM (eta = 0) from latents (prior standard-normal units) back to images in
    model units: the inverse of :func:`invert` on the same grid."""
    sigmas = _grid(denoiser, steps, spacing, latent)
    x = latent * denoiser.process.prior_std()
    return SAMPLERS["ddim"](denoiser, x, sigmas, cond=cond, eta=0.0)


def slerp(a: torch.Tensor, b: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
    """Spherical interpolation between rows: a, b [B, ...] (row i one vector), t a number or a
    tensor [B] (one weight per row).

    slerp = sin((1 - t) omega) / sin(omega) a + sin(t omega) / sin(omega) b, with omega the angle
    between a_i and b_i. Returns a exactly at t = 0 and b at t = 1. For vectors of equal norm
    the norm stays constant along the path (linear interpolation of two independent Gaussian
    latents shrinks it by up to sqrt(2), off the shell where the prior puts its mass).
    Near-parallel (and antipodal) pairs, where the great circle is ill-defined, fall back to
    linear interpolation."""
    t = torch.as_tensor(t, dtype=a.dtype, device=a.device)
    af, bf = a.flatten(1).double(), b.flatten(1).double()
    cos = (af * bf).sum(1) / (af.norm(dim=1) * bf.norm(dim=1)).clamp_min(1e-300)
    omega = torch.arccos(cos.clamp(-1.0, 1.0))
    sin = torch.sin(omega)
    near = sin < 1e-6
    tt = t.double()
    safe = sin.clamp_min(1e-6)
    wa = torch.where(near, 1 - tt, torch.sin((1 - tt) * omega) / safe)
    wb = torch.where(near, tt, torch.sin(tt * omega) / safe)
    out = broadcast_to_batch(wa, a) * a + broadcast_to_batch(wb, b) * b
    tb = broadcast_to_batch(t, a) if t.ndim else t
    return torch.where(tb == 0, a, torch.where(tb == 1, b, out))


@torch.no_grad()
def interpolate(denoiser, za: torch.Tensor, zb: torch.Tensor, n: int, steps: int, cond: dict | None = None, *,
                spacing: str = "uniform") -> torch.Tensor:
    """n images (model units, [n, C, H, W]) decoded by DDIM from latents slerped from ``za`` to
    ``zb`` (each [C, H, W] or [1, C, H, W], prior standard-normal units) at t = 0, 1/(n-1), ..., 1.
    ``cond`` is the condition of a batch of n."""
    return reconstruct(denoiser, slerp_path(za, zb, n), steps, cond, spacing=spacing)


def slerp_path(za: torch.Tensor, zb: torch.Tensor, n: int) -> torch.Tensor:
    """n latents [n, C, H, W] slerped from ``za`` to ``zb`` (each [C, H, W] or [1, C, H, W]) at t = 0, 1/(n-1),
    ..., 1."""
    za, zb = za.reshape(1, *za.shape[-3:]), zb.reshape(1, *zb.shape[-3:])
    t = torch.linspace(0, 1, n, dtype=za.dtype, device=za.device)
    return slerp(za.expand(n, -1, -1, -1), zb.expand(n, -1, -1, -1), t)


def reconstruction_error(original: torch.Tensor, reconstructed: torch.Tensor) -> tuple[float, float]:
    """(MSE, PSNR in dB) between two uint8 image batches, in [0, 255] units; the PSNR is that of the
    mean squared error over all images (inf when they are equal)."""
    mse = float((original.double() - reconstructed.double()).pow(2).mean())
    psnr = math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)
    return mse, psnr


def seed_latent(seed: int, shape, device: str | torch.device = "cpu") -> torch.Tensor:
    """The starting noise of sample 0 of seed ``seed`` ([1, C, H, W], standard normal): the latent
    ``difflab sample --seed S`` decodes into its first image."""
    from difflab.noise import SeededNoise, sample_seeds

    return SeededNoise(sample_seeds(seed, 1)).initial(tuple(shape), device=device)


@torch.no_grad()
def invert_images(denoiser, x0: torch.Tensor, steps: int, cond_fn=None, *, spacing: str = "uniform",
                  refine: int = 0, batch_size: int = 64, reconstruction: bool = True):
    """:func:`invert` batch by batch: (latents float [N, C, H, W], and with ``reconstruction`` their DDIM
    decoding (:func:`decode_latents`) as uint8 [N, C, H, W], else None), both on the CPU. ``cond_fn(slice)``
    gives a batch's condition."""
    latents = []
    for lo in range(0, len(x0), batch_size):
        sl = slice(lo, min(len(x0), lo + batch_size))
        latents.append(invert(denoiser, x0[sl], steps, cond_fn(sl) if cond_fn is not None else None,
                              spacing=spacing, refine=refine).cpu())
    latents = torch.cat(latents)
    recon = decode_latents(denoiser, latents, steps, cond_fn, spacing=spacing, batch_size=batch_size,
                           device=x0.device) if reconstruction else None
    return latents, recon


@torch.no_grad()
def decode_latents(denoiser, latents: torch.Tensor, steps: int, cond_fn=None, *, spacing: str = "uniform",
                   batch_size: int = 64, device=None, on_batch=None) -> torch.Tensor:
    """:func:`reconstruct` batch by batch: latents [N, C, H, W] to uint8 images [N, C, H, W] on the CPU, with
    the denoiser, conditions (``cond_fn(slice)``) and grid they were inverted with; ``on_batch(first, images)``
    as each batch is done."""
    from difflab.figures import to_uint8

    out = []
    for lo in range(0, len(latents), batch_size):
        sl = slice(lo, min(len(latents), lo + batch_size))
        z = latents[sl].to(device) if device is not None else latents[sl]
        cond = cond_fn(sl) if cond_fn is not None else None
        out.append(to_uint8(reconstruct(denoiser, z, steps, cond, spacing=spacing).cpu()))
        if on_batch is not None:
            on_batch(lo, out[-1])
    return torch.cat(out)
