"""Part 1 of the series: degradations for cold diffusion (Bansal et al., 2022, "Cold Diffusion").

The key ingredient of diffusion is not the noise but the degradation: remove the information in
x bit by bit. Any degradation works if the fully degraded image is not the same for every input;
fade to black is the counter-example (every sample is the same image).

One contract, :class:`Degradation`:

- ``prepare(x, generator) -> state``: the per-image randomness (e.g. a random colour), drawn once
  and then held fixed, so that D(x_hat, t) and D(x_hat, t - k) of one sampling run use the same
  colour. ``None`` for deterministic degradations.
- ``degrade(x, t, state) -> x_t``: D(x, t) for levels t (float [B] or a number) in [0, 1];
  D(x, 0) = x and D(x, 1) is fully degraded.
- ``prior(x_ref, state) -> x_T`` = D(x_ref, 1): where sampling starts. For fade-colour,
  fade-black and mask it does not depend on the content of ``x_ref`` (only its shape); for blur
  and pixelate it is the mean colour of ``x_ref``, so pass dataset images.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from difflab.errors import UsageError
from difflab.processes.binomial import draw_uniform


def _levels(t: Tensor | float, x: Tensor) -> Tensor:
    """Levels as a float tensor [B] in the dtype and device of x."""
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device).reshape(-1)
    return t.expand(x.shape[0])


def random_colour(x: Tensor, generator: torch.Generator) -> Tensor:
    """One colour per image, uniform in [-1, 1] per channel: [B, C, 1, 1] (grey levels for C = 1)."""
    b, c = x.shape[:2]
    return (draw_uniform((b, c, 1, 1), generator, x.device) * 2 - 1).to(x.dtype)


class Degradation:
    """D(x, t): degrade images x ([B, C, H, W] in [-1, 1]) to level t in [0, 1]; see the module docstring."""

    name: str = ""

    def prepare(self, x: Tensor, generator: torch.Generator) -> Tensor | None:
        """Per-image randomness held fixed for one training batch or one sampling run (None here)."""
        return None

    def degrade(self, x: Tensor, t: Tensor | float, state: Tensor | None = None) -> Tensor:
        raise NotImplementedError

    def prior(self, x_ref: Tensor, state: Tensor | None = None) -> Tensor:
        """The fully degraded image x_T = D(x_ref, 1) that cold sampling starts from."""
        return self.degrade(x_ref, 1.0, state)

    def _colour(self, state: Tensor | None) -> Tensor:
        if state is None:
            raise ValueError(f"degradation {self.name!r} needs the state from .prepare(x, generator)")
        return state

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class FadeToColour(Degradation):
    """x_t = (1 - t) x + t c with a random colour c per image (the state, [B, C, 1, 1])."""

    name = "fade-colour"

    def prepare(self, x: Tensor, generator: torch.Generator) -> Tensor:
        return random_colour(x, generator)

    def degrade(self, x: Tensor, t: Tensor | float, state: Tensor | None = None) -> Tensor:
        a = _levels(t, x).view(-1, 1, 1, 1)
        return (1 - a) * x + a * self._colour(state)


class FadeToBlack(Degradation):
    """x_t = (1 - t) x + t (-1): every image ends all black, so cold sampling collapses to one sample."""

    name = "fade-black"

    def degrade(self, x: Tensor, t: Tensor | float, state: Tensor | None = None) -> Tensor:
        a = _levels(t, x).view(-1, 1, 1, 1)
        return (1 - a) * x - a


class Mask(Degradation):
    """Hide round(t * h * w) pixels under the image's random colour (the state, [B, C, 1, 1]).

    Pixels are hidden in one fixed random order (a permutation seeded by ``seed``, the same for
    every image and every run), so the level tells the network exactly which pixels are hidden.
    Masking with a fixed colour would collapse like fade-to-black; the random colour per image is
    what makes the fully masked images differ.
    """

    name = "mask"

    def __init__(self, seed: int = 0) -> None:
        self.seed = int(seed)
        self._ranks: dict[tuple[int, int], Tensor] = {}

    def rank(self, h: int, w: int) -> Tensor:
        """rank[p]: pixel p (flat index) is hidden once round(t*h*w) > rank[p]."""
        if (h, w) not in self._ranks:
            g = torch.Generator().manual_seed(self.seed)
            self._ranks[h, w] = torch.randperm(h * w, generator=g).argsort()
        return self._ranks[h, w]

    def prepare(self, x: Tensor, generator: torch.Generator) -> Tensor:
        return random_colour(x, generator)

    def degrade(self, x: Tensor, t: Tensor | float, state: Tensor | None = None) -> Tensor:
        b, _, h, w = x.shape
        colour = self._colour(state)
        hidden = torch.round(_levels(t, x).double() * (h * w))
        masked = self.rank(h, w).to(x.device)[None, :] < hidden[:, None]
        return torch.where(masked.view(b, 1, h, w), colour, x)

    def __repr__(self) -> str:
        return f"Mask(seed={self.seed})"


def gaussian_blur(x: Tensor, sigma: Tensor) -> Tensor:
    """Separable Gaussian blur with one std per image (``sigma`` [B], pixels), reflect padding.

    sigma = 0 is the identity. Each kernel is truncated at 3 sigma (and at the image size).
    """
    b, c, h, w = x.shape
    sigma = sigma.to(x.dtype).clamp_min(1e-6)[:, None]
    radius = math.ceil(3 * float(sigma.max()))
    for dim, size in ((2, h), (3, w)):
        r = min(radius, size - 1)
        if r == 0:
            continue
        offsets = torch.arange(-r, r + 1, device=x.device, dtype=x.dtype)[None, :]
        # truncate each image's kernel at its own 3 sigma, so a batch blurs like its images one by one
        inside = offsets.abs() <= torch.ceil(3 * sigma)
        kernel = torch.exp(-0.5 * (offsets / sigma) ** 2) * inside
        kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)
        if dim == 2:
            padded, weight = F.pad(x, (0, 0, r, r), mode="reflect"), kernel.view(b * c, 1, 2 * r + 1, 1)
        else:
            padded, weight = F.pad(x, (r, r, 0, 0), mode="reflect"), kernel.view(b * c, 1, 1, 2 * r + 1)
        x = F.conv2d(padded.reshape(1, b * c, *padded.shape[2:]), weight, groups=b * c).view(b, c, h, w)
    return x


class Blur(Degradation):
    """Gaussian blur with std sigma_max * t, faded towards the image's mean colour by t^2.

    Blur alone never quite removes everything; the fade makes D(x, 1) exactly the mean colour of
    x, which differs per input (the cold diffusion prior needs such a distribution).
    ``sigma_max`` defaults to a quarter of the smaller image side.
    """

    name = "blur"

    def __init__(self, sigma_max: float | None = None) -> None:
        self.sigma_max = sigma_max

    def degrade(self, x: Tensor, t: Tensor | float, state: Tensor | None = None) -> Tensor:
        a = _levels(t, x)
        sigma_max = self.sigma_max if self.sigma_max is not None else min(x.shape[-2:]) / 4
        fade = (a**2).view(-1, 1, 1, 1)
        return (1 - fade) * gaussian_blur(x, sigma_max * a) + fade * x.mean(dim=(2, 3), keepdim=True)

    def __repr__(self) -> str:
        return f"Blur(sigma_max={self.sigma_max})"


def pixelate(x: Tensor, block: int) -> Tensor:
    """Average over blocks of block x block pixels, then upsample (nearest) back to the image size."""
    h, w = x.shape[-2:]
    if block == 1:
        return x
    small = F.adaptive_avg_pool2d(x, (math.ceil(h / block), math.ceil(w / block)))
    return F.interpolate(small, size=(h, w), mode="nearest")


class Pixelate(Degradation):
    """Pixelation with block size 2^(t J), J = ceil(log2(max(h, w))), so D(x, 1) is the mean colour.

    Between two dyadic block sizes the images are blended linearly, which keeps D continuous in t
    and its distance to x increasing (the block averages are nested projections).
    """

    name = "pixelate"

    def degrade(self, x: Tensor, t: Tensor | float, state: Tensor | None = None) -> Tensor:
        levels = max(1, math.ceil(math.log2(max(x.shape[-2:]))))
        pyramid = torch.stack([pixelate(x, 2**j) for j in range(levels + 1)])
        u = _levels(t, x) * levels
        lo = u.floor().long().clamp(0, levels - 1)
        frac = (u - lo).view(-1, 1, 1, 1)
        batch = torch.arange(x.shape[0], device=x.device)
        return (1 - frac) * pyramid[lo, batch] + frac * pyramid[lo + 1, batch]


DEGRADATIONS: dict[str, type[Degradation]] = {
    cls.name: cls for cls in (FadeToColour, FadeToBlack, Mask, Blur, Pixelate)
}


def get_degradation(name: str, **kwargs) -> Degradation:
    """The degradation called ``name`` (a key of DEGRADATIONS), built with ``kwargs``."""
    if name not in DEGRADATIONS:
        raise UsageError(f"unknown degradation {name!r}; choose one of {', '.join(DEGRADATIONS)}")
    return DEGRADATIONS[name](**kwargs)
