"""The forward process to look at: any process of the series applied to one image at a range of
levels, with the curve that describes it (used by ``difflab serve``'s forward panel; as useful in a
notebook). The states are the chains of :mod:`difflab.processes.chains`, which ``difflab figures`` draws too.

>>> from difflab.forward import FORWARD_PROCESSES, forward_view
>>> view = forward_view("binomial", x, levels=61, seed=0)   # x: [1, C, H, W] in [-1, 1]
>>> view.frames.shape, view.untouched[-1]                    # uint8 [61, C, H, W], ~0.15 on 32x32

Every view has ``frames`` (z_t at the times ``t``, t normalised to [0, 1]) and one curve: the
log10 signal-to-noise ratio for Gaussian processes, the fraction of pixels never touched for
binomial and pixel noise, the mean distance |z_t - x| for degradations. Gaussian frames are shown at
unit variance, z_t / sqrt(gammabar_t^2 + sigmabar_t^2), so that VE processes (sigma up to 50) stay
visible.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from difflab.errors import UsageError
from difflab.figures import to_uint8
from difflab.processes import BinomialNoise, get_degradation, make_process
from difflab.processes.chains import degradation_chain, gaussian_chain, pixel_chain
from difflab.processes.degradations import DEGRADATIONS
from difflab.processes.gaussian import GaussianProcess

# name -> (family, one line shown beside the picker)
FORWARD_PROCESSES: dict[str, tuple[str, str]] = {
    "binomial": ("binomial", "part 1: k = 32 random pixels a step set to black or white, T = 60, with replacement"),
    "binomial-no-replace": ("binomial", "part 1: the same without replacement (every pixel at most once; "
                            "T = min(60, h w / k))"),
    "pixel-noise": ("pixel", "part 1, algorithm 2: one pixel a step without replacement, T = h w"),
    **{name: ("degradation", f"cold diffusion: {name}") for name in DEGRADATIONS},
    "linear": ("gaussian", "part 3: DDPM linear betas 1e-4..0.02, T = 1000"),
    "cosine": ("gaussian", "part 3: cosine schedule (offset 0.008), T = 1000"),
    "sigmoid": ("gaussian", "part 3: sigmoid schedule, T = 1000"),
    "constant-0.9": ("gaussian", "part 3: constant gamma = 0.9 over 120 steps (converges)"),
    "constant-0.99": ("gaussian", "part 3: constant gamma = 0.99 over 120 steps (does not converge)"),
    "vp": ("gaussian", "part 4: continuous VP SDE, linear beta 0.1..20"),
    "vp-cosine": ("gaussian", "part 4: continuous VP, cosine"),
    "ve": ("gaussian", "part 4: continuous VE, sigma 0.01..50"),
    "flow": ("gaussian", "part 6: rectified flow, z_t = (1 - t) x + t s (the default process)"),
}
GAUSSIAN_CONFIGS = {
    "linear": {"kind": "discrete", "schedule": "linear"},
    "cosine": {"kind": "discrete", "schedule": "cosine"},
    "sigmoid": {"kind": "discrete", "schedule": "sigmoid"},
    "constant-0.9": {"kind": "discrete", "schedule": "constant", "gamma": 0.9, "T": 120},
    "constant-0.99": {"kind": "discrete", "schedule": "constant", "gamma": 0.99, "T": 120},
    "vp": {"kind": "vp"},
    "vp-cosine": {"kind": "vp-cosine"},
    "ve": {"kind": "ve"},
    "flow": {"kind": "flow"},
}
BINOMIAL_K, BINOMIAL_T = 32, 60  # the series' settings


@dataclass
class ForwardView:
    """z_t of one image at times ``t`` (normalised to [0, 1]) and the process's curve."""

    name: str
    frames: torch.Tensor  # uint8 [K, C, H, W]
    t: list[float]
    curve_label: str
    curve: list[float | None]  # one value per frame (None where it is not finite)
    summary: str
    untouched: list[float] = field(default_factory=list)  # binomial and pixel noise: measured per frame
    log_scale: bool = False


def gaussian_process(name: str) -> GaussianProcess:
    """The Gaussian process of ``name`` (a Gaussian entry of FORWARD_PROCESSES)."""
    return make_process(GAUSSIAN_CONFIGS[name])


def forward_view(name: str, x: torch.Tensor, levels: int = 41, seed: int = 0) -> ForwardView:
    """The forward process ``name`` on one image ``x`` ([1, C, H, W], model units): ``levels`` frames
    from t = 0 to the end (binomial noise: every one of its T + 1 steps)."""
    if name not in FORWARD_PROCESSES:
        raise UsageError(f"unknown process '{name}'; choose one of {', '.join(FORWARD_PROCESSES)}")
    if levels < 2:
        raise UsageError(f"levels must be at least 2, got {levels}")
    family = FORWARD_PROCESSES[name][0]
    return {"binomial": _binomial, "pixel": _pixel, "degradation": _degradation,
            "gaussian": _gaussian}[family](name, x, levels, seed)


def _binomial(name, x, levels, seed) -> ForwardView:
    h, w = x.shape[-2:]
    replace = name == "binomial"
    # without replacement the walk ends when every pixel is used: T = hw / k steps at most
    steps = BINOMIAL_T if replace else max(1, min(BINOMIAL_T, h * w // BINOMIAL_K))
    noise = BinomialNoise(BINOMIAL_K, steps, replace=replace)
    noise.check(h, w)
    frames = noise.chain(x, torch.Generator().manual_seed(seed))
    # the same draws on a marker image (0 is never a noise bit): pixels still 0 were never touched
    marks = noise.chain(torch.zeros_like(x[:, :1]), torch.Generator().manual_seed(seed))
    measured = [float((m == 0).float().mean()) for m in marks]
    n = h * w
    expected = [(1 - noise.k / n) ** t if noise.replace else max(0.0, 1 - t * noise.k / n) for t in range(noise.T + 1)]
    return ForwardView(name, to_uint8(frames.flatten(0, 1)), [t / noise.T for t in range(noise.T + 1)],
                       "expected fraction of pixels never touched", expected, noise.summary(h, w), measured)


def _pixel(name, x, levels, seed) -> ForwardView:
    steps, frames = pixel_chain(x, levels, torch.Generator().manual_seed(seed))
    T = x.shape[-2] * x.shape[-1]
    untouched = [1 - t / T for t in steps]
    return ForwardView(name, to_uint8(frames.flatten(0, 1)), [t / T for t in steps], "fraction of pixels never touched",
                       untouched, f"pixel noise: T = h w = {T} steps, z_t drawn directly", untouched)


def _degradation(name, x, levels, seed) -> ForwardView:
    ts, frames = degradation_chain(get_degradation(name), x, levels, torch.Generator().manual_seed(seed))
    frames = frames.flatten(0, 1)
    dist = [float((f - x[0]).abs().mean()) for f in frames]
    note = " (every image ends the same: cold sampling collapses)" if name == "fade-black" else ""
    return ForwardView(name, to_uint8(frames), ts, "mean |z_t - x| (model units)", dist,
                       f"degradation {name}: D(x, 0) = x, D(x, 1) fully degraded{note}")


def _gaussian(name, x, levels, seed) -> ForwardView:
    process = gaussian_process(name)
    ts, frames = gaussian_chain(process, x, levels, torch.Generator().manual_seed(seed))
    # SNR is infinite at t = 0 of discrete schedules: the curve starts at the first step
    snr = process.snr(ts.clamp_min(process.t_min if not process.discrete else 1.0))
    span = process.t_max - process.t_min
    summary = process.describe() if process.discrete else f"{FORWARD_PROCESSES[name][1]}: SNR at t_max = {float(snr[-1]):.3g}"
    return ForwardView(name, to_uint8(frames.flatten(0, 1)), [float((t - process.t_min) / span) for t in ts],
                       "log10 SNR(t)", [float(v) if v.isfinite() else None for v in torch.log10(snr)], summary,
                       log_scale=True)  # (None: flow's pure noise at t = 1, SNR 0, left out of the plot)
