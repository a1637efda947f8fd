"""Consistency tuning (ECT: Geng et al. 2025, "Consistency models made easy"): a trained Gaussian run's
denoiser, read as a consistency function f(x, sigma) (:mod:`difflab.samplers.consistency`), tuned so that f
agrees with itself along every probability-flow trajectory, which makes one or two evaluations draw an image.

The loss at a pair of noise levels r < t of one clean image x and one noise s (the same for both points):

    d(f(x + t s, t), stopgrad f(x + r s, r)) / (t - r)

with d the pseudo-Huber distance sqrt(|a - b|^2 + c^2) - c (c = 0: the L2 distance), t lognormal
(log t ~ N(-1.1, 2^2)), and r = r(t) from ECT's mapping function: r = t (1 - n(t) / q^(stage + 1)), clamped
at 0, with n(t) = 1 + k sigmoid(-b t). At the first stage most pairs have r = 0, where f is x itself (the
boundary condition): the loss is then diffusion training on x0; each stage (``stage_steps`` steps) divides the
gap t - r by q, toward the continuous-time consistency condition.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch

from difflab.errors import UsageError
from difflab.methods.noise_levels import lognormal_sigma
from difflab.samplers.consistency import consistency_function

# the intermediate level of 2-step sampling: the best of 0.4 to 2.5 on MNIST (bench/RESULTS.md; ECT: 0.821 on CIFAR-10)
SIGMA_MID = 2.0


@dataclass(frozen=True)
class Tuning:
    """ECT's settings (the paper's CIFAR-10 values unless noted)."""

    p_mean: float = -1.1  # log t ~ N(p_mean, p_std^2)
    p_std: float = 2.0
    q: float = 2.0  # each stage divides the gap t - r by q
    stage_steps: int = 100  # optimiser steps per stage (ECT counts stages in images; a CPU budget is small)
    k: float = 8.0  # n(t) = 1 + k sigmoid(-b t): a wider gap at small t
    b: float = 1.0
    huber_c: float = 0.0  # pseudo-Huber c in model units per sqrt(pixel) (0: the L2 distance)

    def __post_init__(self) -> None:
        checks = {"p_std": self.p_std > 0, "q": self.q > 1, "stage_steps": self.stage_steps >= 1,
                  "k": self.k >= 0, "b": self.b >= 0, "huber_c": self.huber_c >= 0,
                  "p_mean": math.isfinite(self.p_mean)}
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise UsageError(f"consistency tuning setting {bad[0]} = {getattr(self, bad[0])} is out of range "
                             "(p_std > 0, q > 1, stage_steps >= 1, k, b, huber_c >= 0)")

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> Tuning:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def r_of(self, t: torch.Tensor, step: int) -> torch.Tensor:
        """ECT's mapping function: the lower level r of each t at ``step`` (0 where the gap reaches below 0)."""
        stage = step // self.stage_steps
        n = 1 + self.k * torch.sigmoid(-self.b * t)
        return (t * (1 - n / self.q ** (stage + 1))).clamp_min(0)


def ect_loss(f, x: torch.Tensor, t: torch.Tensor, r: torch.Tensor, noise: torch.Tensor, cond=None,
             huber_c: float = 0.0) -> torch.Tensor:
    """The scalar ECT loss of clean images x at levels t > r (per sample, [B]) with one noise image each:
    f(x, sigma, cond) is the consistency function being tuned; the target is computed without gradient, with
    the same random state (dropout masks) as the prediction."""
    def level(s):
        return s.to(x.dtype).view(-1, *[1] * (x.dim() - 1))

    rng = torch.random.get_rng_state()
    pred = consistency_function(f, x + level(t) * noise, t, cond)
    with torch.no_grad():
        torch.random.set_rng_state(rng)
        target = consistency_function(f, x + level(r) * noise, r, cond)
    pixels = x[0].numel()
    d2 = (pred.float() - target.float()).pow(2).flatten(1).sum(1)
    c = huber_c * math.sqrt(pixels)
    dist = torch.sqrt(d2 + (c * c or 1e-30)) - c  # (a floor under the L2 distance: its gradient at 0)
    return (dist / math.sqrt(pixels) / (t - r).float()).mean()


def tuning_levels(tuning: Tuning, u: torch.Tensor, step: int, lo: float, hi: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(t, r) of uniforms ``u`` in (0, 1) at ``step`` (float64): t lognormal, clamped to [lo, hi] (the levels
    the sampler starts from and the process reaches), r by the mapping function."""
    t = lognormal_sigma(u, tuning.p_mean, tuning.p_std).clamp(lo, hi)
    return t, tuning.r_of(t, step)
