"""Where a run's sampling grid ends: the noise level below which its denoiser has nothing left to do.

The karras and geometric grids end at ``--sample-sigma-min``; their last step denoises from there. Its default
``auto`` follows the data: at the end of training the EMA denoiser's relative x0 error

    e(sigma) = E ||D(x + sigma n, sigma) - x||^2 / (numel(x) Var(x))

is measured on a fixed held batch of training images (:data:`HELD` of them, chosen and noised with fixed
seeds) at the levels :data:`SIGMAS` (log-spaced, 8 a decade from 0.01 to 10), and the bottom is the largest
level below which every measured error stays under :data:`FRACTION` of the data variance. Var(x) is the
variance of every pixel value of the batch, so for Gaussian data N(mu, s^2 I) the exact denoiser's error is
sigma^2 / (s^2 + sigma^2) and the bottom is the largest level under s sqrt(f / (1 - f)).

It costs 1,600 network evaluations (64 images at 25 levels), about as many as the trainer's final grid.
The measurement is kept in ``RUN/grid-bottom.json`` (written atomically, checked when read). A run without
one (trained before it existed, or stopped by a signal) samples from :data:`FALLBACK`, the bottom chosen on
MNIST before; :meth:`difflab.runs.draw.Run.measure_grid_bottom` measures an existing run on demand.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from difflab.errors import CheckpointError

FRACTION = 0.04  # MNIST (nearly binary digits) keeps its bottom of about 0.5: bench/RESULTS.md
SIGMAS = tuple(float(s) for s in torch.logspace(-2, 1, 25, dtype=torch.float64))
HELD = 64
SEED = 0
FALLBACK = 0.5
FILE = "grid-bottom.json"
_TOP = 80.0  # the grids' top (samplers.SIGMA_TOP): a bottom must lie below it


def relative_errors(denoiser, x: torch.Tensor, sigmas=SIGMAS, cond: dict | None = None, seed: int = SEED) -> list[float]:
    """e(sigma) (module docstring) of ``denoiser`` D(x, sigma, cond) on clean images ``x`` (model units), with
    the noise of ``seed`` (one draw, scaled for every level)."""
    x = x.double()
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(x.device)
    variance = float(x.var(unbiased=False))
    errors = []
    with torch.no_grad():
        for sigma in sigmas:
            level = torch.full((len(x),), float(sigma), dtype=torch.float64, device=x.device)
            x0 = denoiser((x + sigma * noise).to(x.dtype), level, cond).double()
            error = float((x0 - x).pow(2).mean())
            errors.append(error / variance if variance > 0 else math.inf)  # identical images: nothing to measure
    return errors


def choose(sigmas, errors, fraction: float = FRACTION) -> float:
    """The largest level of the increasing ``sigmas`` below which every error is under ``fraction``; 0 (the
    process's own bottom) when the smallest level is already over it."""
    bottom = 0.0
    for sigma, error in zip(sigmas, errors):
        if not error < fraction:
            break
        bottom = float(sigma)
    return bottom


def measure(denoiser, x: torch.Tensor, cond: dict | None = None, *, step: int | None = None,
            fraction: float = FRACTION) -> dict[str, Any]:
    """The measurement kept in ``RUN/grid-bottom.json``: the chosen ``sigma_min``, the rule's settings and
    every level's error."""
    errors = relative_errors(denoiser, x, SIGMAS, cond)
    return {"sigma_min": choose(SIGMAS, errors, fraction), "fraction": fraction, "step": step, "n": len(x),
            "seed": SEED, "sigmas": list(SIGMAS), "errors": errors}


def held_batch(n_images: int, n: int = HELD) -> torch.Tensor:
    """The indices of the held batch: ``n`` of ``n_images`` chosen by a fixed seed."""
    return torch.randperm(n_images, generator=torch.Generator().manual_seed(SEED))[:n]


def measure_training(run_dir: str | Path, method, net, data, conditioner, step: int,
                     device: torch.device | str = "cpu") -> dict | None:
    """Measure the bottom of a run at the end of training and save it (None for methods without a Gaussian
    denoiser, and when an error is not finite): ``net`` is the EMA network, ``data`` the training data (any
    :class:`~difflab.data.source.ImageSource`: only the held batch is read; its labels and the conditioner for
    class and text runs: the batch is measured under its own conditions)."""
    if not (method.conditional and method.draws_samples):
        return None
    from difflab.data.imagedata import to_model

    idx = held_batch(len(data))
    cond = None
    if conditioner is not None and conditioner.kind != "none" and data.labels is not None:
        cond = conditioner.for_labels(data.labels[idx], device)
    net.eval()
    result = measure(method.denoiser(net), to_model(data.read(idx), device), cond, step=step)
    if not all(math.isfinite(e) for e in result["errors"]):  # no level to trust: sampling keeps the fallback
        return None
    save(run_dir, result)
    return result


def save(run_dir: str | Path, result: dict) -> Path:
    """Write a measurement to ``RUN/grid-bottom.json`` atomically."""
    from difflab.files import write_text

    _check(result, Path(run_dir) / FILE)
    return write_text(Path(run_dir) / FILE, json.dumps(result, indent=2, allow_nan=False))


def _check(result: Any, path: Path) -> None:
    def bad(why: str) -> CheckpointError:
        return CheckpointError(f"{path} is corrupt ({why}); delete it (sampling then starts from sigma {FALLBACK:g})")

    if not isinstance(result, dict):
        raise bad("not a JSON object")
    bottom = result.get("sigma_min")
    if isinstance(bottom, bool) or not isinstance(bottom, (int, float)) or not 0 <= bottom < _TOP:
        raise bad(f"sigma_min is {json.dumps(bottom)}, not a noise level in [0, {_TOP:g})")
    for key in ("sigmas", "errors"):
        values = result.get(key)
        if not isinstance(values, list) or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
            raise bad(f"'{key}' is not a list of numbers")


def load(run_dir: str | Path) -> dict | None:
    """The run's measurement, checked; None when it has none."""
    path = Path(run_dir) / FILE
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise CheckpointError(f"cannot read {path} ({e.strerror}); delete it or fix its permissions") from e
    try:
        result = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is corrupt ({e}); delete it (sampling then starts from sigma {FALLBACK:g})") from e
    _check(result, path)
    return result


def run_bottom(run_dir: str | Path | None, setting: float | str) -> float:
    """The grid bottom a run samples with unless told: its ``--sample-sigma-min``, or for ``auto`` the measured
    level (:data:`FALLBACK` without a measurement)."""
    if setting != "auto":
        return float(setting)
    measured = load(run_dir) if run_dir is not None else None
    return FALLBACK if measured is None else float(measured["sigma_min"])
