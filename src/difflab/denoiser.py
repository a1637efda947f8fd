"""The canonical model interface: every trained network, whatever it predicts, becomes
one function D(x, sigma, cond) -> x0_hat that all samplers, guidance and the
likelihood call.

x is in VE coordinates (y = z_t / gammabar_t) and sigma = sigmabar_t / gammabar_t
is the noise level (EDM, k-diffusion). A parameterisation is only the rule that
turns the network's output into x0_hat (NVlabs/edm's preconditioning idea):

- ``eps``: the network predicts the noise s (Ho et al.): x0 = (z - sigmabar s) / gammabar
- ``x0``: the network predicts the clean image
- ``v``: v = gammabar s - sigmabar x (Salimans & Ho): x0 = (gammabar z - sigmabar v) / (gammabar^2 + sigmabar^2)
- ``zprev``: the series' version 1, the network predicts the mean of z_{t-1} (discrete T only)
- ``edm``: D = c_skip y + c_out F(c_in y, t) with sigma_data = 0.5 (Karras et al.)
- ``velocity``: the flow-matching target v = s - x (Lipman et al., Liu et al.; dz/dt on the flow process):
  z = gammabar x + sigmabar (v + x), so x0 = (z - sigmabar v) / (gammabar + sigmabar) (z - t v on the flow)

At an infinite noise level (the flow process's t = 1) a sample is held as y / sigma (= z_1, the noise):
the network's input is then sigmabar y / sigma for every parameterisation but edm's (whose c_in y / sigma
tends to 1), and x0 is finite for x0, v, velocity and edm (not for eps).

:class:`ClipX0` limits any denoiser's x0_hat to the data range (clipping, or Imagen's dynamic
thresholding) with the same call, so every sampler, guidance rule and inversion gets it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from difflab.broadcast import broadcast_to_batch
from difflab.errors import UsageError
from difflab.processes.gaussian import DiscreteSchedule, GaussianProcess

PREDICTIONS = ("eps", "x0", "v", "zprev", "edm", "velocity")
CLIP_MODES = ("none", "clip", "dynamic")
SIGMA_DATA = 0.5

Cond = dict[str, Any]


class Denoiser(nn.Module):
    """D(x, sigma, cond) -> x0_hat around a network ``net(z, t, **cond)``."""

    def __init__(self, net: nn.Module, process: GaussianProcess, prediction: str = "eps"):
        super().__init__()
        if prediction not in PREDICTIONS:
            raise UsageError(f"unknown prediction '{prediction}'; choose one of {', '.join(PREDICTIONS)}")
        if prediction == "zprev" and not isinstance(process, DiscreteSchedule):
            raise UsageError("prediction 'zprev' (predict z_{t-1}) needs a discrete schedule")
        self.net, self.process, self.prediction = net, process, prediction

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: Cond | None = None) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, device=x.device).reshape(-1).expand(x.shape[0])
        t = self.process.t_of(sigma.double())
        return self.x0_from_output(x, sigma, t, self.net_output(x, sigma, t, cond))

    def net_input(self, x: torch.Tensor, sigma: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the network sees: z_t = gammabar y, or c_in y for EDM (from y / sigma at an infinite level)."""
        held = torch.isinf(sigma)
        if self.prediction == "edm":
            scale = torch.where(held, 1.0, 1 / torch.sqrt(sigma.double() ** 2 + SIGMA_DATA**2))
        else:
            scale = torch.where(held, self.process.noise_scale(t), self.process.signal_scale(t))
        return x * broadcast_to_batch(scale, x)

    def net_output(self, x, sigma, t, cond: Cond | None = None) -> torch.Tensor:
        # the network may run in another precision (pure bf16 weights for fast sampling)
        p = next(self.net.parameters(), None)
        dtype = p.dtype if p is not None and p.is_floating_point() else x.dtype
        z = self.net_input(x, sigma, t).to(dtype)
        out = self.net(z, self.process.net_time(t).to(x.device), **(cond or {}))
        return out.to(x.dtype)

    def x0_from_output(self, x, sigma, t, out) -> torch.Tensor:
        """Turn the network's raw output into the clean-image estimate (in VE coordinates)."""
        p = self.prediction
        if p == "x0":
            return out
        if p == "eps":
            return x - broadcast_to_batch(sigma, x) * out
        a, s = self.process.signal_scale(t), self.process.noise_scale(t)
        if p in ("v", "velocity"):
            z = self.net_input(x, sigma, t)
            if p == "velocity":
                return (z - broadcast_to_batch(s, x) * out) / broadcast_to_batch(a + s, x)
            return (broadcast_to_batch(a, x) * z - broadcast_to_batch(s, x) * out) / broadcast_to_batch(a**2 + s**2, x)
        if p == "zprev":
            proc: DiscreteSchedule = self.process  # type: ignore[assignment]
            ti = t.round().long().clamp(1, proc.T)
            gb_prev, sb2 = proc.gammabar(ti - 1), proc.sigmabar(ti) ** 2
            c_x, c_z = gb_prev * proc.beta(ti) / sb2, proc.gamma(ti) * (1 - gb_prev**2) / sb2
            return (out - broadcast_to_batch(c_z * a, x) * x) / broadcast_to_batch(c_x, x)
        # edm
        s2 = sigma.double() ** 2
        c_skip = SIGMA_DATA**2 / (s2 + SIGMA_DATA**2)
        c_out = torch.where(torch.isinf(sigma), SIGMA_DATA, sigma.double() * SIGMA_DATA / torch.sqrt(s2 + SIGMA_DATA**2))
        return broadcast_to_batch(c_skip, x) * x + broadcast_to_batch(c_out, x) * out

    def x0_per_output(self, sigma: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """d x0_hat / d output per sample [B] (float64): every parameterisation is affine in the network's
        output, so an output error e moves x0_hat by this times e (-sigma for eps, 1 for x0,
        -sigmabar / (gammabar^2 + sigmabar^2) for v, -sigmabar / (gammabar + sigmabar) for velocity, c_out
        for edm). Read off x0_from_output itself."""
        sigma, t = torch.as_tensor(sigma, dtype=torch.float64), torch.as_tensor(t, dtype=torch.float64)
        zero = torch.zeros(sigma.numel(), 1, dtype=torch.float64, device=sigma.device)
        return (self.x0_from_output(zero, sigma, t, zero + 1) - self.x0_from_output(zero, sigma, t, zero)).reshape(-1)

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, z_prev: torch.Tensor | None = None):
        """The regression target of the network for clean x0, noise s and time t (training)."""
        p = self.prediction
        if p == "eps":
            return noise
        if p == "x0":
            return x0
        a, s = broadcast_to_batch(self.process.signal_scale(t), x0), broadcast_to_batch(self.process.noise_scale(t), x0)
        if p == "v":
            return a * noise - s * x0
        if p == "velocity":
            return noise - x0
        if p == "zprev":
            return z_prev
        sigma = self.process.sigma_ve(t)
        s2 = sigma.double() ** 2
        c_skip = SIGMA_DATA**2 / (s2 + SIGMA_DATA**2)
        c_out = sigma.double() * SIGMA_DATA / torch.sqrt(s2 + SIGMA_DATA**2)
        y = x0 + broadcast_to_batch(sigma, x0) * noise
        return ((x0 - broadcast_to_batch(c_skip, x0) * y) / broadcast_to_batch(c_out, x0)).to(x0.dtype)

    # --- other views of the same model ----------------------------------------------------------
    def eps(self, x: torch.Tensor, sigma: torch.Tensor, cond: Cond | None = None) -> torch.Tensor:
        """The noise estimate f(z_t, t) = (y - x0_hat) / sigma."""
        return (x - self(x, sigma, cond)) / broadcast_to_batch(torch.as_tensor(sigma, device=x.device), x)

    def score(self, z: torch.Tensor, t: torch.Tensor, cond: Cond | None = None) -> torch.Tensor:
        """The score grad log p(z_t) ~ -f(z_t, t) / sigmabar_t in the process's own coordinates
        (noise prediction is a scaled score)."""
        t = torch.as_tensor(t, device=z.device).reshape(-1).expand(z.shape[0])
        a, s = self.process.signal_scale(t), self.process.noise_scale(t)
        y = z / broadcast_to_batch(a, z)
        return -self.eps(y, (s / a), cond) / broadcast_to_batch(s, z)

    def tweedie(self, z: torch.Tensor, t: torch.Tensor, cond: Cond | None = None) -> torch.Tensor:
        """Tweedie's formula E[x | z_t] = (z_t + sigmabar_t^2 score) / gammabar_t (equals D)."""
        t = torch.as_tensor(t, device=z.device).reshape(-1).expand(z.shape[0])
        a, s = self.process.signal_scale(t), self.process.noise_scale(t)
        return (z + broadcast_to_batch(s**2, z) * self.score(z, t, cond)) / broadcast_to_batch(a, z)


class ClipX0(nn.Module):
    """x0_hat limited to the data range ``[lo, hi]``, around any denoiser (outermost, after guidance).

    - ``clip``: clamp to the range (diffusers' ``clip_sample``, lucidrains' ``clip_denoised``). A model
      early in training, or a few-step sampler at high noise, predicts x0 far outside the pixel range,
      and every later step inherits it (flat black or white images); the clamp removes that.
    - ``dynamic``: Imagen's dynamic thresholding (Saharia et al. 2022). Per sample, s is the
      ``percentile`` quantile of |x0_hat| in range units, at least 1; x0_hat is clamped to [-s, s] and
      divided by s, so saturated pixels are pulled back instead of cut off.
    - ``none``: unchanged (likelihood, exact inversion, data that is not bounded).
    """

    def __init__(self, denoiser: nn.Module, mode: str = "clip", data_range: tuple[float, float] = (-1.0, 1.0),
                 percentile: float = 0.995):
        super().__init__()
        if mode not in CLIP_MODES:
            raise UsageError(f"unknown x0 clipping '{mode}'; choose one of {', '.join(CLIP_MODES)}")
        lo, hi = (float(v) for v in data_range)
        if not hi > lo:
            raise UsageError(f"the data range must have lo < hi, got [{lo}, {hi}]")
        if not 0 < percentile <= 1:
            raise UsageError(f"the dynamic-thresholding percentile must be in (0, 1], got {percentile}")
        self.denoiser, self.mode, self.percentile = denoiser, mode, float(percentile)
        self.centre, self.half = (hi + lo) / 2, (hi - lo) / 2
        self.process = denoiser.process

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: Cond | None = None) -> torch.Tensor:
        return self.limit(self.denoiser(x, sigma, cond))

    def limit(self, x0: torch.Tensor) -> torch.Tensor:
        """The clipped (or thresholded) x0 estimate."""
        if self.mode == "none":
            return x0
        u = (x0 - self.centre) / self.half  # in range units: [-1, 1] is the data range
        if self.mode == "clip":
            u = u.clamp(-1, 1)
        else:
            s = torch.quantile(u.flatten(1).abs().float(), self.percentile, dim=1).clamp_min(1).to(u.dtype)
            s = broadcast_to_batch(s, u)
            u = torch.maximum(torch.minimum(u, s), -s) / s
        return u * self.half + self.centre
