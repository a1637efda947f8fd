"""Part 5: guidance, as wrappers with the canonical call D(x, sigma, cond) -> x0_hat.

Convention (printed by ``difflab sample --help``): the guidance scale g multiplies the
conditional direction, f_hat = f(z, null) + g (f(z, c) - f(z, null)), so g = 1 + w with w
the weight of Ho & Salimans; g = 1 is plain conditional sampling and g = 0 unconditional.
Because x0_hat = y - sigma f is affine in the noise estimate f, mixing x0 estimates with
the same weights is the same rule.

Classifier guidance (Dhariwal & Nichol) steers with a noisy classifier p(c | z_t, t): in the
process's own coordinates f_hat = f(z_t, t) - w sigmabar_t grad_z log p(c | z_t, t). With
x0 = (z - sigmabar f) / gammabar, y = z / gammabar (so grad_z = grad_y / gammabar) and
sigma = sigmabar / gammabar this is, in the samplers' VE coordinates,
x0_hat = D(y, sigma) + w sigma^2 grad_y log p(c | y, sigma): the same rule for every process.
It is applied only up to a noise level ``sigma_max`` (a guidance interval, Kynkaanniemi et al.
2024): an ideal classifier's sigma^2 grad_y log p stays of the order of the data's range, but a
learned one sees pure noise at the top of a VP schedule (the cosine schedule's t = T has
sigma = 1 / gammabar_T ~ 2e4), and any gradient it has there is amplified by sigma^2.

Autoguidance (Karras et al. 2024, "Guiding a Diffusion Model with a Bad Version of Itself") needs
no condition: D_hat = D_guide + w (D - D_guide), with the guide a weaker model of the same data (here
the run's own EMA from early in training). Where both agree nothing changes; where the better model
has moved away from the weaker one's blur, the step goes further that way. w = 1 is plain sampling.

Both take one guidance interval (``--guide-sigmas``, Kynkaanniemi et al. 2024): outside it the network is
called once, unguided. Both can make the guided estimate with APG or guidance rescale instead of the plain
extrapolation (:class:`GuidanceRule`), two answers to the over-saturation of strong guidance, and can keep
each image's mean colour where the stronger estimate puts it (``keep_mean``: the update's mean per channel is
removed), which stops guidance from shifting the colour balance of a whole image.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import torch
from torch import nn

from difflab.broadcast import broadcast_to_batch
from difflab.errors import UsageError

EVERYWHERE = (0.0, math.inf)  # a guidance interval that holds every noise level


def _cat_cond(a: dict | None, b: dict | None) -> dict | None:
    if a is None:
        return None
    return {k: torch.cat([a[k], b[k]]) for k in a}


@dataclass(frozen=True)
class APG:
    """Adaptive projected guidance (Sadat et al. 2025): the guidance update Delta = x0_strong - x0_weak,
    run through a momentum average (v = Delta + ``momentum`` v_previous, the paper's negative beta pushing
    away from the last step's update), its norm capped at ``threshold`` (per sample, over all pixels), is split
    into a part parallel to x0_strong and one orthogonal to it; the parallel part, which mostly raises
    saturation, is weighted by ``eta``: x0 = x0_strong + (g - 1) (Delta_orth + eta Delta_par). eta = 1 with no
    cap and no momentum is plain guidance."""

    eta: float = 0.0
    threshold: float = math.inf
    momentum: float = 0.0


class GuidanceRule:
    """How a guided x0 is made from a stronger and a weaker estimate at scale g: x0_weak + g (x0_strong -
    x0_weak), or :class:`APG`'s projected update; with ``keep_mean`` the update x0_guided - x0_strong loses its
    mean over each image's pixels, per channel, so the guided estimate keeps the stronger one's mean colour
    (brightness on grey images) and guidance changes only the structure around it (the extrapolation away
    from a weaker model's duller colours otherwise shifts every image towards their complement, cyan on
    reddish photos: bench/RESULTS.md, "mean-free guidance"); then guidance rescale (Lin et al. 2024) with ``rescale`` phi:
    the result times phi std(x0_strong) / std(x0_guided) + (1 - phi), per sample, which pulls the guided
    estimate's spread back towards the stronger (conditional) estimate's (phi = 1: exactly its std). One rule per wrapper: APG's
    momentum follows one trajectory per thread, and a call at a higher noise level than the last (or with
    another batch size) starts a new one."""

    def __init__(self, scale: float, rescale: float = 0.0, apg: APG | None = None, keep_mean: bool = False):
        if not 0 <= rescale <= 1:
            raise UsageError(f"--guidance-rescale must be in [0, 1], got {rescale}")
        self.scale, self.rescale, self.apg, self.keep_mean = float(scale), float(rescale), apg, bool(keep_mean)
        self._state = threading.local()  # APG's momentum: (last sigma, running update) of this thread's batch

    def __call__(self, strong: torch.Tensor, weak: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        if self.apg is None:
            out = weak + self.scale * (strong - weak)
        else:
            out = strong + (self.scale - 1) * self._projected(strong, strong - weak, sigma)
        if self.keep_mean and out.ndim > 2:
            update = out - strong
            out = strong + (update - update.mean(dim=(-2, -1), keepdim=True))
        if self.rescale == 0:
            return out
        dims = tuple(range(1, out.ndim))
        ratio = strong.std(dim=dims, keepdim=True) / out.std(dim=dims, keepdim=True).clamp_min(1e-12)
        return out * (self.rescale * ratio + (1 - self.rescale))

    def _projected(self, strong: torch.Tensor, delta: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        apg, dims = self.apg, tuple(range(1, delta.ndim))
        if apg.momentum != 0:
            last = getattr(self._state, "last", None)
            fresh = last is None or last[1].shape != delta.shape or bool((sigma > last[0]).any())
            delta = delta if fresh else delta + apg.momentum * last[1]
            self._state.last = (sigma.clone(), delta)
        if math.isfinite(apg.threshold):
            norm = delta.flatten(1).norm(dim=1).reshape(-1, *[1] * (delta.ndim - 1))
            delta = delta * (apg.threshold / norm.clamp_min(1e-12)).clamp(max=1.0)
        unit = strong / strong.flatten(1).norm(dim=1).reshape(-1, *[1] * (delta.ndim - 1)).clamp_min(1e-12)
        parallel = (delta * unit).sum(dim=dims, keepdim=True) * unit
        return (delta - parallel) + apg.eta * parallel


def _interval(sigmas) -> tuple[float, float]:
    lo, hi = (float(s) for s in sigmas)
    if not 0 <= lo <= hi:
        raise UsageError(f"--guide-sigmas must be 0 <= LO <= HI, got {lo:g} {hi:g}")
    return lo, hi


def _per_sample(sigma, x: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(sigma, device=x.device).reshape(-1).expand(x.shape[0])


class ClassifierFreeGuidance(nn.Module):
    """f_hat = f(z, null) + g (f(z, c) - f(z, null)), both passes batched into one forward call, at the noise
    levels in ``sigmas`` = (lo, hi), inclusive (the guidance interval, Kynkaanniemi et al. 2024); elsewhere the
    conditional pass alone, at half the cost. ``rescale``, ``apg`` and ``keep_mean``: see :class:`GuidanceRule`."""

    def __init__(self, denoiser, null_cond: dict, scale: float, sigmas: tuple[float, float] = EVERYWHERE, *,
                 rescale: float = 0.0, apg: APG | None = None, keep_mean: bool = False):
        super().__init__()
        self.denoiser, self.null_cond, self.scale = denoiser, null_cond, float(scale)
        self.sigmas, self.rule = _interval(sigmas), GuidanceRule(scale, rescale, apg, keep_mean)
        self.process = denoiser.process

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: dict | None = None) -> torch.Tensor:
        sig = _per_sample(sigma, x)
        inside = guided(sig, self.sigmas)
        if self.scale == 1.0 or not bool(inside.any()):  # exactly plain conditional sampling, at half the cost
            return self.denoiser(x, sigma, cond)
        null = {k: v[: x.shape[0]] for k, v in self.null_cond.items()}
        both = self.denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), _cat_cond(cond, null))
        x0_c, x0_u = both.chunk(2)
        out = self.rule(x0_c, x0_u, sig)
        return out if bool(inside.all()) else torch.where(inside.reshape(-1, *[1] * (x.ndim - 1)), out, x0_c)


class Autoguidance(nn.Module):
    """D_hat = D_guide + w (D - D_guide) (Karras et al. 2024): ``guide`` is a weaker denoiser of the same
    data with the same call (the run's EMA from early in training, wrapped like ``denoiser``). Only at
    noise levels in ``sigmas`` = (lo, hi), inclusive (a guidance interval, Kynkaanniemi et al. 2024);
    elsewhere D alone, at half the cost. ``rescale``, ``apg`` and ``keep_mean``: see :class:`GuidanceRule`."""

    def __init__(self, denoiser, guide, scale: float, sigmas: tuple[float, float] = EVERYWHERE, *,
                 rescale: float = 0.0, apg: APG | None = None, keep_mean: bool = False):
        super().__init__()
        self.denoiser, self.guide, self.scale = denoiser, guide, float(scale)
        self.sigmas, self.rule = _interval(sigmas), GuidanceRule(scale, rescale, apg, keep_mean)
        self.process = denoiser.process

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: dict | None = None) -> torch.Tensor:
        x0 = self.denoiser(x, sigma, cond)
        sigma = _per_sample(sigma, x)
        inside = guided(sigma, self.sigmas)
        if self.scale == 1.0 or not bool(inside.any()):
            return x0
        x0_guide = self.guide(x, sigma, cond)
        return torch.where(inside.reshape(-1, *[1] * (x.ndim - 1)), self.rule(x0, x0_guide, sigma), x0)


def guided(sigma, sigmas: tuple[float, float]):
    """Whether noise level(s) ``sigma`` lie in the guidance interval ``sigmas`` = (lo, hi), inclusive."""
    return (sigma >= sigmas[0]) & (sigma <= sigmas[1])


CLASSIFIER_SIGMA_MAX = 80.0  # the top of EDM's sampling range (SNR 1.6e-4)


class ClassifierGuidance(nn.Module):
    """x0_hat = D(x, sigma, cond) + w sigma^2 grad_x log p(c | x, sigma) (VE coordinates) for
    sigma <= ``sigma_max``; above it plain D (``math.inf``: guide at every level).

    ``cond["classifier_labels"]`` (int64 [B]) is the class c to steer towards; it is removed before
    the denoiser is called, so the rest of ``cond`` (a class label or a prompt, possibly under
    classifier-free guidance) still reaches the network. ``classifier.log_prob(x, sigma, labels)``
    gives log p(c | x, sigma) [B] in VE coordinates (``difflab.runs.classifier``); its gradient
    is taken with autograd even inside the samplers' ``no_grad``."""

    def __init__(self, denoiser, classifier, scale: float, sigma_max: float = CLASSIFIER_SIGMA_MAX):
        super().__init__()
        if not sigma_max > 0:
            raise UsageError(f"--classifier-sigma-max must be positive (inf: guide at every noise level), got {sigma_max}")
        self.denoiser, self.classifier, self.scale = denoiser, classifier, float(scale)
        self.sigma_max = float(sigma_max)
        self.process = denoiser.process

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: dict | None = None) -> torch.Tensor:
        if not cond or "classifier_labels" not in cond:
            raise UsageError("classifier guidance needs the class to steer towards (--class)")
        labels = cond["classifier_labels"]
        rest = {k: v for k, v in cond.items() if k != "classifier_labels"}
        x0 = self.denoiser(x, sigma, rest or None)
        sigma = torch.as_tensor(sigma, device=x.device).reshape(-1).expand(x.shape[0])
        inside = sigma <= self.sigma_max
        if self.scale == 0.0 or not bool(inside.any()):
            return x0
        weight = torch.where(inside, self.scale * sigma**2, torch.zeros_like(sigma))
        return x0 + broadcast_to_batch(weight, x) * self.grad_log_prob(x, sigma, labels)

    def grad_log_prob(self, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """grad_x log p(labels | x, sigma), per sample (the sum over the batch separates)."""
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(self.classifier.log_prob(xg, sigma, labels).sum(), xg)
        return grad.to(x.dtype)
