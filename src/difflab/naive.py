"""Part 1 of the series: naive diffusion and cold diffusion as short pure functions.

- Algorithm 1, predict the previous step: f(z_t, t) ~ z_{t-1} under binomial noise, loss
  ||z_{t-1} - f(z_t, t)||^2; sampling runs z_{t-1} = f(z_t, t) from random bits z_T.
- Algorithm 2, denoise then renoise: pixel noise with T = h*w, f(z_t, t) predicts the clean image
  x, loss ||x - f(z_t, t)||^2 with t uniform; sampling in S steps alternates x_hat = f(z, t) and
  z = add_noise(x_hat, t - k), optionally with the cold diffusion update.
- Cold diffusion (Bansal et al., 2022): any degradation D(x, t) of :mod:`difflab.processes.degradations`;
  f predicts x from D(x, t) (L1 loss, as in the paper), sampling with their improved update
  x_{t-k} = x_t - D(x_hat, t) + D(x_hat, t - k) (Algorithm 2) or x_{t-k} = D(x_hat, t - k) (Algorithm 1).

Network time: every function here calls ``net(z, time)`` with ``time`` a float32 tensor [B] equal to
TIME_SCALE (1000) times the fraction of the process: 1000 t / T for algorithm 1 (t the step), 1000 t / (h w)
for algorithm 2 (t the number of noised pixels) and 1000 t for cold diffusion (t the level in [0, 1]).
This is the continuous-time convention of the networks, so their time input always lies in [0, 1000].

All randomness comes from an explicit ``torch.Generator``; algorithm 1's training noise is a pure
function of (seed, batch index, t), so training resumes exactly from a step count.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from difflab.processes.binomial import BinomialNoise, PixelNoise, draw_uniform, random_bits
from difflab.processes.degradations import Degradation

TIME_SCALE = 1000.0

Net = Callable[[Tensor, Tensor], Tensor]
Callback = Callable[[dict], None]


def network_time(fraction: Tensor | float, batch: int, device: torch.device | str | None = None) -> Tensor:
    """The time the network sees: TIME_SCALE * fraction of the process, float32 [batch]."""
    fraction = torch.as_tensor(fraction, dtype=torch.float32, device=device).reshape(-1)
    return (TIME_SCALE * fraction).expand(batch)


def _device(net: Net, device: torch.device | str | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    param = next(net.parameters(), None) if isinstance(net, torch.nn.Module) else None
    return param.device if param is not None else torch.device("cpu")


# Algorithm 1: predict the previous step.


def naive1_position(step: int, T: int) -> tuple[int, int]:
    """Where global training step n falls on the walk through the chains: (batch index n // T, t = n % T + 1).

    The walk takes one gradient step per noising step: batch b is used for T consecutive steps.
    """
    return step // T, step % T + 1


def batch_generator(seed: int, batch_index: int) -> torch.Generator:
    """A CPU generator seeded by a splitmix64 hash of (seed, batch_index)."""
    mask = (1 << 64) - 1
    z = (seed * 0x9E3779B97F4A7C15 + batch_index + 1) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return torch.Generator().manual_seed(z ^ (z >> 31))


def naive1_pair(
    x: Tensor, t: int, noise: BinomialNoise, seed: int, batch_index: int
) -> tuple[Tensor, Tensor]:
    """(z_{t-1}, z_t) of the noising chain of batch x, a pure function of (x, t, seed, batch_index).

    The chain is re-run from z_0 = x with the generator of (seed, batch_index); t cheap noising steps
    replace any state that would otherwise have to be checkpointed. The caller must pass the same x
    for the same batch index.
    """
    if not 1 <= t <= noise.T:
        raise ValueError(f"naive1_pair: t={t} outside 1..T={noise.T}")
    prev = cur = x
    for z in noise.walk(x, batch_generator(seed, batch_index), steps=t):
        prev, cur = cur, z
    return prev, cur


def naive1_loss(net: Net, z_prev: Tensor, z_t: Tensor, t: int | Tensor, T: int) -> Tensor:
    """||z_{t-1} - f(z_t, t)||^2 (mean over pixels): the network removes one step of noise."""
    time = network_time(torch.as_tensor(t, dtype=torch.float32) / T, z_t.shape[0], z_t.device)
    return F.mse_loss(net(z_t, time), z_prev)


@torch.no_grad()
def naive1_sample(
    net: Net,
    shape: tuple[int, int, int, int],
    T: int,
    generator: torch.Generator,
    *,
    callback: Callback | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """z_T = random bits, then z_{t-1} = f(z_t, t) for t = T..1; returns z_0 clamped to [-1, 1].

    ``callback(dict(i, t, x, x0))`` after each step, with x = x0 = z_t for the new t.
    """
    device = _device(net, device)
    z = random_bits(shape, generator, device=device)
    for i, t in enumerate(range(T, 0, -1)):
        z = net(z, network_time(t / T, shape[0], device))
        if callback is not None:
            callback({"i": i, "t": t - 1, "x": z, "x0": z})
    return z.clamp(-1, 1)


# Algorithm 2: denoise, then renoise.


def naive2_loss(net: Net, x: Tensor, generator: torch.Generator, noise: PixelNoise | None = None) -> Tensor:
    """||x - f(z_t, t)||^2 with t uniform in 1..T = h*w per image and z_t drawn directly."""
    noise = noise if noise is not None else PixelNoise(*x.shape[-2:])
    b = x.shape[0]
    t = (1 + (draw_uniform((b,), generator, x.device) * noise.T).long()).clamp(max=noise.T)
    z = noise.sample(x, t, generator)
    return F.mse_loss(net(z, network_time(t / noise.T, b, x.device)), x)


@torch.no_grad()
def naive2_sample(
    net: Net,
    shape: tuple[int, int, int, int],
    steps: int,
    generator: torch.Generator,
    *,
    cold_update: bool = False,
    told_noise: float = 1.0,
    callback: Callback | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Denoise-renoise sampling in ``steps`` = S steps from random bits (t = T = h*w down to 0).

    Each step predicts x_hat = f(z, t) (clipped to [-1, 1]) and moves to t' = the next of the S+1
    evenly spaced integers T..0 (k = T/S pixels fewer). Renoising draws fresh random pixels,
    z = add_noise(x_hat, t'), as in the series. ``cold_update`` uses z = z - D(x_hat, t) + D(x_hat, t')
    instead, with D the pixel noise of ONE pixel order and bit pattern drawn for the whole run (z_T is
    its bits); then pixels revealed at a step keep the value predicted then. ``told_noise`` < 1 tells the
    network that fewer pixels are noise than there are (time told_noise * t / T): it takes more of the
    random pixels for strokes, so samples differ more instead of all following the mean image (with the
    cold update and 0.6, all ten MNIST digits appear; bench/RESULTS.md). Returns the last x_hat.
    ``callback(dict(i, t, x, x0))`` after each step with x = z at level t = t' and x0 = x_hat.
    """
    b, _, h, w = shape
    noise = PixelNoise(h, w)
    T = noise.T
    if not 1 <= steps <= T:
        raise ValueError(f"naive2_sample: steps={steps} outside 1..T={T} (T = h*w)")
    if not 0 < told_noise <= 1:
        raise ValueError(f"naive2_sample: told_noise={told_noise} outside (0, 1]")
    device = _device(net, device)
    blank = torch.zeros(shape, device=device)
    state = noise.prepare(blank, generator)
    z = noise.apply(blank, T, state)
    ts = [T * (steps - i) // steps for i in range(steps + 1)]
    x0 = z
    for i in range(steps):
        t, t_next = ts[i], ts[i + 1]
        x0 = net(z, network_time(told_noise * t / T, b, device)).clamp(-1, 1)
        if cold_update:
            z = z + (noise.apply(x0, t_next, state) - noise.apply(x0, t, state))
        else:
            z = noise.sample(x0, t_next, generator)
        if callback is not None:
            callback({"i": i, "t": t_next, "x": z, "x0": x0})
    return x0


# Cold diffusion: any degradation.


def cold_loss(
    net: Net, x: Tensor, degradation: Degradation, generator: torch.Generator, *, norm: str = "l1"
) -> Tensor:
    """||x - f(D(x, t), t)|| with t uniform in (0, 1] per image; L1 by default (Bansal et al.), or "l2"."""
    b = x.shape[0]
    t = (1 - draw_uniform((b,), generator, x.device)).to(x.dtype)
    state = degradation.prepare(x, generator)
    pred = net(degradation.degrade(x, t, state), network_time(t, b, x.device))
    if norm == "l1":
        return (pred - x).abs().mean()
    if norm == "l2":
        return F.mse_loss(pred, x)
    raise ValueError(f"cold_loss: norm must be 'l1' or 'l2', got {norm!r}")


def cold_prior(
    degradation: Degradation, x_ref: Tensor, generator: torch.Generator
) -> tuple[Tensor, Tensor | None]:
    """(x_T, state) to start cold sampling: the run's randomness and x_T = D(x_ref, 1).

    x_ref gives the shape; for blur and pixelate pass dataset images (x_T is their mean colour).
    """
    state = degradation.prepare(x_ref, generator)
    return degradation.prior(x_ref, state), state


@torch.no_grad()
def cold_sample(
    net: Net,
    x_T: Tensor,
    degradation: Degradation,
    steps: int,
    state: Tensor | None = None,
    *,
    improved: bool = True,
    callback: Callback | None = None,
) -> Tensor:
    """Cold diffusion sampling from x_T in ``steps`` equal steps of level, t = 1 .. 0.

    x_hat = f(x_t, t) (clipped to [-1, 1]); ``improved``: x_{t'} = x_t - D(x_hat, t) + D(x_hat, t')
    (Bansal et al. Algorithm 2, exact for a perfect f), else x_{t'} = D(x_hat, t') (Algorithm 1).
    ``state`` must be the one x_T was made with (see :func:`cold_prior`). Returns x_0 in [-1, 1].
    ``callback(dict(i, t, x, x0))`` after each step.
    """
    if steps < 1:
        raise ValueError(f"cold_sample: steps must be >= 1, got {steps}")
    x = x_T
    b = x.shape[0]
    for i in range(steps):
        t, t_next = (steps - i) / steps, (steps - i - 1) / steps
        x0 = net(x, network_time(t, b, x.device)).clamp(-1, 1)
        if improved:
            x = x + (degradation.degrade(x0, t_next, state) - degradation.degrade(x0, t, state))
        else:
            x = degradation.degrade(x0, t_next, state)
        if callback is not None:
            callback({"i": i, "t": t_next, "x": x, "x0": x0})
    return x.clamp(-1, 1)
