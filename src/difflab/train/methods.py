"""What the trainer trains: a method turns a batch into a loss, and a trained network into samples.

- :class:`GaussianMethod`: parts 3 to 5, discrete (DDPM) or continuous time, any parameterisation.
- :class:`Naive1Method`, :class:`Naive2Method`, :class:`ColdMethod`: part 1.

Randomness is a pure function of (run seed, step, sample position in the global batch), so a
resumed run and a run on any number of ranks see the same noise.
"""

from __future__ import annotations

from typing import Any

import torch

from difflab import naive
from difflab.config import TrainConfig
from difflab.denoiser import Denoiser
from difflab.errors import UsageError
from difflab.noise import seeded_normal, seeded_uniform
from difflab.processes.binomial import BinomialNoise, PixelNoise
from difflab.processes.continuous import make_process
from difflab.processes.degradations import get_degradation
from difflab.processes.gaussian import DiscreteSchedule, GaussianProcess
from difflab.train.noise_levels import training_times
from difflab.train.weighting import loss_weight, weighted_mse


def process_config(cfg: TrainConfig) -> dict[str, Any]:
    """The Gaussian process a run trains with, as a config dict."""
    if cfg.process in ("vp", "vp-cosine", "ve"):
        return {"kind": cfg.process}
    params: dict[str, Any] = {"T": cfg.T}
    if cfg.process == "constant":
        params["gamma"] = cfg.gamma
    return {"kind": "discrete", "schedule": cfg.process, **params}


def _generator(seed: int, step: int, device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + step) % (2**63 - 1))
    return g


class GaussianMethod:
    """Gaussian diffusion: z_t = gammabar_t x + sigmabar_t s; the network regresses the target of its
    parameterisation (the noise s for ``eps``: Ho et al.'s simple loss)."""

    name = "gaussian"

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.process: GaussianProcess = make_process(process_config(cfg))

    def describe(self) -> str:
        p = self.process
        head = p.describe() if isinstance(p, DiscreteSchedule) else f"continuous {p.config()['kind']} process"
        return f"{head}; the network predicts {self.cfg.prediction}"

    def batch_index(self, step: int) -> int:
        return step

    def denoiser(self, net) -> Denoiser:
        return Denoiser(net, self.process, self.cfg.prediction)

    def loss(self, net, x: torch.Tensor, cond: dict | None, step: int, seeds: torch.Tensor) -> torch.Tensor:
        den = self.denoiser(net)
        p, dev = self.process, x.device
        t = training_times(p, seeded_uniform(seeds, step, (), dev), self.cfg.noise_sampling)
        noise = seeded_normal(seeds, step, x.shape[1:], dev)
        z_prev = None
        if self.cfg.prediction == "zprev":  # the series' version 1: z_{t-1}, then one step to z_t
            z_prev = p.marginal(x, t - 1, seeded_normal(seeds, step + (1 << 30), x.shape[1:], dev))
            z = p.step(z_prev, t.long(), noise)
            sigma = p.sigma_ve(t.double())
            y = z / p.alpha(t).to(x.dtype).view(-1, 1, 1, 1)
        else:
            sigma = p.sigma_ve(t.double())
            y = x + sigma.to(x.dtype).view(-1, 1, 1, 1) * noise
        inp = den.net_input(y, sigma, t).to(x.dtype)
        out = net(inp, p.net_time(t), **(cond or {}))
        target = den.target(x, noise, t, z_prev).to(torch.float32)
        return weighted_mse(out, target, loss_weight(self.cfg.loss_weighting, den, sigma, t, self.cfg.min_snr_gamma))

    @torch.no_grad()
    def sample(self, net, n: int, shape, *, seed: int = 0, steps: int = 50, sampler: str = "ddim",
               device="cpu", cond_fn=None, **options) -> torch.Tensor:
        from difflab.samplers import generate

        return generate(self.denoiser(net), n, shape, seed=seed, sampler=sampler, steps=steps,
                        device=device, cond_fn=cond_fn, **options)


class Naive1Method:
    """Algorithm 1: predict the previous step of the binomial chain; the chain is walked in order,
    one gradient step per noising step (batch b serves T consecutive steps)."""

    name = "naive1"

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.noise = BinomialNoise(cfg.k, cfg.T, replace=cfg.replace)

    def describe(self, h: int = 32, w: int = 32) -> str:
        return self.noise.summary(h, w)

    def batch_index(self, step: int) -> int:
        return naive.naive1_position(step, self.cfg.T)[0]

    def loss(self, net, x, cond, step, seeds):
        b, t = naive.naive1_position(step, self.cfg.T)
        z_prev, z_t = naive.naive1_pair(x, t, self.noise, self.cfg.seed, b)
        return naive.naive1_loss(net, z_prev, z_t, t, self.cfg.T)

    @torch.no_grad()
    def sample(self, net, n, shape, *, seed=0, steps=None, device="cpu", callback=None, **_):
        return naive.naive1_sample(net, (n, *shape), self.cfg.T, _generator(seed, 0, "cpu"),
                                   callback=callback, device=device)


class Naive2Method:
    """Algorithm 2: pixel noise one pixel at a time (T = h*w), predict the clean image; sample by
    denoise-then-renoise in S steps (optionally with the cold-diffusion update)."""

    name = "naive2"

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg

    def describe(self) -> str:
        return "algorithm 2: pixel noise without replacement (T = h*w), predict x"

    def batch_index(self, step: int) -> int:
        return step

    def loss(self, net, x, cond, step, seeds):
        return naive.naive2_loss(net, x, _generator(self.cfg.seed, step, "cpu"), PixelNoise(*x.shape[-2:]))

    @torch.no_grad()
    def sample(self, net, n, shape, *, seed=0, steps=64, device="cpu", callback=None, cold_update=False, **_):
        T = shape[-2] * shape[-1]
        if not 1 <= steps <= T:
            raise UsageError(f"naive2 samples in 1 to T = h*w = {T} steps on {shape[-2]}x{shape[-1]} images, "
                             f"got --steps {steps}")
        return naive.naive2_sample(net, (n, *shape), steps, _generator(seed, 0, "cpu"),
                                   cold_update=cold_update, callback=callback, device=device)


class ColdMethod:
    """Cold diffusion: any degradation D(x, t), the network restores x (L1 loss)."""

    name = "cold"

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.degradation = get_degradation(cfg.degradation)
        self.reference: torch.Tensor | None = None  # dataset images for priors that need them

    def describe(self) -> str:
        return f"cold diffusion with degradation {self.degradation!r}"

    def batch_index(self, step: int) -> int:
        return step

    def loss(self, net, x, cond, step, seeds):
        return naive.cold_loss(net, x, self.degradation, _generator(self.cfg.seed, step, "cpu"))

    @torch.no_grad()
    def sample(self, net, n, shape, *, seed=0, steps=50, device="cpu", callback=None, improved=True, **_):
        if steps < 1:
            raise UsageError(f"cold diffusion samples in at least 1 step, got --steps {steps}")
        g = _generator(seed, 0, "cpu")
        if self.reference is not None:
            idx = torch.randint(0, len(self.reference), (n,), generator=g)
            x_ref = self.reference[idx].to(device)
        else:
            x_ref = torch.zeros(n, *shape, device=device)
        x_T, state = naive.cold_prior(self.degradation, x_ref, g)
        return naive.cold_sample(net, x_T, self.degradation, steps, state, improved=improved, callback=callback)


METHOD_CLASSES = {"gaussian": GaussianMethod, "naive1": Naive1Method, "naive2": Naive2Method, "cold": ColdMethod}


def make_method(cfg: TrainConfig):
    return METHOD_CLASSES[cfg.method](cfg)
