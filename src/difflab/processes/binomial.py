"""Part 1 of the series: binomial noise, the naive diffusion's way of destroying an image.

A noising step picks pixels and sets each to black (-1) or white (+1) with probability 1/2,
the same bit for every channel of the pixel. Two processes:

- :class:`BinomialNoise` (algorithm 1): k pixels per step for T steps, z_0 = x, ..., z_T.
  With replacement a pixel noised earlier may be picked again, so some pixels are never
  touched (about 15% for the series' k = 32, T = 60 on 32x32); without replacement a random
  order of the pixels is walked, k new pixels a step, which needs T * k <= h * w.
- :class:`PixelNoise` (algorithm 2): one pixel a step without replacement, T = h * w, so z_t
  can be drawn directly: t random pixels set to random bits.

Every random draw takes an explicit ``torch.Generator``. Draws happen on the generator's
device (in float64 where they decide an order, so ties cannot make CPU and GPU disagree) and
are then moved to the image's device: a CPU generator gives the same noise on every device.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from difflab.errors import UsageError


class NoiseSettingsError(UsageError, ValueError):
    """Noise settings that cannot work for the image size (a UsageError and a ValueError)."""


def draw_uniform(shape: tuple[int, ...], generator: torch.Generator, device: torch.device) -> Tensor:
    """Uniform [0, 1) float64 draws from ``generator``, moved to ``device``."""
    u = torch.rand(shape, generator=generator, device=generator.device, dtype=torch.float64)
    return u.to(device)


def _bits(shape: tuple[int, ...], generator: torch.Generator, like: Tensor) -> Tensor:
    """-1 (black) or +1 (white) with probability 1/2, in the dtype and device of ``like``."""
    return (draw_uniform(shape, generator, like.device) < 0.5).to(like.dtype) * 2 - 1


def random_bits(
    shape: tuple[int, int, int, int] | torch.Size,
    generator: torch.Generator,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """The fully noised image z_T: every pixel black or white with probability 1/2, shared by channels."""
    b, c, h, w = shape
    like = torch.empty(0, device=device, dtype=dtype)
    return _bits((b, 1, h, w), generator, like).expand(b, c, h, w).contiguous()


def _set_pixels(z: Tensor, index: Tensor, values: Tensor) -> Tensor:
    """A copy of z with pixels ``index`` ([B, m], flat h*w positions) set to ``values`` ([B, m]) in every channel."""
    b, c, h, w = z.shape
    flat = z.reshape(b, c, h * w).clone()
    m = index.shape[1]
    flat.scatter_(2, index[:, None, :].expand(b, c, m), values[:, None, :].expand(b, c, m).to(z.dtype))
    return flat.view(b, c, h, w)


class BinomialNoise:
    """Algorithm 1's noise: each step sets k pixels to random black/white, for T steps.

    ``replace=True``: every step picks k distinct pixels uniformly among all h*w, whether or not
    they were noised before, so a pixel escapes one step with probability 1 - k/(hw) and is never
    touched with probability (1 - k/(hw))^T. ``replace=False``: a random order of the pixels is
    drawn once per image (``order``) and step t noises positions (t-1)k .. tk-1 of it, so the
    untouched fraction is exactly 1 - Tk/(hw). The pixels are chosen per image.
    """

    def __init__(self, k: int, T: int, replace: bool = True) -> None:
        if k < 1 or T < 1:
            raise NoiseSettingsError(f"binomial noise needs k >= 1 and T >= 1, got k={k}, T={T}")
        self.k, self.T, self.replace = int(k), int(T), bool(replace)

    def check(self, h: int, w: int) -> None:
        """Raise NoiseSettingsError if (k, T) cannot noise an h x w image this way."""
        n = h * w
        if self.k > n:
            raise NoiseSettingsError(f"binomial noise: k={self.k} pixels per step, but {h}x{w} has only {n}")
        if not self.replace and self.T * self.k > n:
            raise NoiseSettingsError(
                f"binomial noise without replacement needs T*k <= h*w, but T*k = {self.T}*{self.k} = "
                f"{self.T * self.k} > {h}x{w} = {n} pixels: lower T or k, or sample with replacement"
            )

    def untouched_fraction(self, h: int, w: int) -> float:
        """Expected fraction of pixels of z_T never noised: (1 - k/hw)^T, or 1 - Tk/hw without replacement."""
        self.check(h, w)
        n = h * w
        if self.replace:
            return (1.0 - self.k / n) ** self.T
        return 1.0 - self.T * self.k / n

    def summary(self, h: int, w: int) -> str:
        """One line for logs, e.g. 'binomial noise k=32, T=60 on 32x32: 14.9% of pixels never touched ...'."""
        how = "with" if self.replace else "without"
        frac = self.untouched_fraction(h, w)
        return (
            f"binomial noise k={self.k}, T={self.T} on {h}x{w}: "
            f"{100 * frac:.1f}% of pixels never touched ({how} replacement)"
        )

    def order(self, x: Tensor, generator: torch.Generator) -> Tensor | None:
        """The walk without replacement: a random permutation of the h*w pixels per image ([B, h*w]).

        None with replacement (nothing is drawn then).
        """
        if self.replace:
            return None
        b, _, h, w = x.shape
        self.check(h, w)
        return draw_uniform((b, h * w), generator, generator.device).argsort(dim=1).to(x.device)

    def step(self, z: Tensor, t: int, generator: torch.Generator, order: Tensor | None = None) -> Tensor:
        """z_t from z_{t-1}: k pixels per image set to random bits (``order`` from :meth:`order` if no replacement)."""
        b, _, h, w = z.shape
        self.check(h, w)
        if self.replace:
            keys = draw_uniform((b, h * w), generator, generator.device)
            index = keys.topk(self.k, dim=1).indices.to(z.device)
        else:
            if order is None:
                raise ValueError(
                    "binomial noise without replacement: step needs the order from .order(x, generator)"
                )
            if not 1 <= t <= self.T:
                raise ValueError(f"step t={t} outside 1..T={self.T}")
            index = order[:, (t - 1) * self.k : t * self.k]
        return _set_pixels(z, index, _bits((b, self.k), generator, z))

    def walk(self, x: Tensor, generator: torch.Generator, steps: int | None = None) -> Iterator[Tensor]:
        """Yield z_0 = x, z_1, ..., z_steps (default T). Draws are made in a fixed order, so the first
        t images are the same whatever ``steps`` is: z_t is a function of (x, generator state, t)."""
        steps = self.T if steps is None else steps
        if not 0 <= steps <= self.T:
            raise ValueError(f"steps={steps} outside 0..T={self.T}")
        order = self.order(x, generator)
        z = x
        yield z
        for t in range(1, steps + 1):
            z = self.step(z, t, generator, order)
            yield z

    def chain(self, x: Tensor, generator: torch.Generator) -> Tensor:
        """The whole noising chain z_0 .. z_T stacked: [T+1, B, C, H, W]."""
        return torch.stack(list(self.walk(x, generator)))


@dataclass(frozen=True)
class PixelNoiseState:
    """The randomness of one pixel-noise draw, so that D(x, t) = apply(x, t, state) is deterministic.

    ``rank[b, p]``: pixel p of image b is noised at step rank + 1 (a random permutation per image).
    ``bits[b, p]``: the black (-1) / white (+1) value it then gets, shared by all channels.
    """

    rank: Tensor
    bits: Tensor


class PixelNoise:
    """Algorithm 2's noise: one pixel a step without replacement, T = h*w, z_t drawn directly.

    z_t = x with the t pixels of lowest rank in a random per-image order set to random bits;
    this has the law of t sequential single-pixel steps without replacement. Vectorised over the
    batch: each image may have its own t.
    """

    def __init__(self, h: int, w: int) -> None:
        self.h, self.w = int(h), int(w)
        self.T = self.h * self.w

    def _check(self, x: Tensor) -> None:
        if tuple(x.shape[-2:]) != (self.h, self.w):
            raise ValueError(f"pixel noise for {self.h}x{self.w} images got shape {tuple(x.shape)}")

    def prepare(self, x: Tensor, generator: torch.Generator) -> PixelNoiseState:
        """Draw a pixel order and bits per image of ``x`` (only its shape and device are used)."""
        self._check(x)
        b = x.shape[0]
        rank = draw_uniform((b, self.T), generator, generator.device).argsort(dim=1).argsort(dim=1)
        return PixelNoiseState(rank=rank.to(x.device), bits=_bits((b, self.T), generator, x))

    def apply(self, x: Tensor, t: Tensor | int, state: PixelNoiseState) -> Tensor:
        """D(x, t): x with the pixels of rank < t replaced by the state's bits. t: int or long [B] in 0..T."""
        self._check(x)
        b, c = x.shape[:2]
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(b)
        noised = (state.rank < t[:, None])[:, None, :]
        z = torch.where(noised, state.bits[:, None, :].to(x.dtype), x.reshape(b, c, self.T))
        return z.view_as(x)

    def sample(self, x: Tensor, t: Tensor | int, generator: torch.Generator) -> Tensor:
        """z_t for clean images x: t (int or long [B]) random pixels per image set to random bits."""
        return self.apply(x, t, self.prepare(x, generator))
