"""What a new run gets for the settings it was not given, decided in one place.

- Part-1 methods take the series' reference settings (:data:`METHOD_DEFAULTS`, applied by
  :func:`apply_method_defaults` to the flags not typed).
- The guidance interval (``--guide-sigma-min/max`` -1) depends on the conditioning (:func:`guide_interval`).
- Gaussian diffusion takes ``TrainConfig``'s own defaults, which are the recipe measured best for a short
  CPU budget (bench/RESULTS.md, "Defaults"), and :func:`resolve` fills the two settings that depend on the
  machine and the network: the learning rate (``--lr 0``, auto) and the precision (``--precision auto``).

The resolved recipe is printed when a run starts (:func:`describe`) and saved in its config.json.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from difflab.config import TrainConfig

# The series' reference settings (SPEC part 1): Adam 3e-4, batch 16, warm-up over the first 1000
# images (63 steps of 16), gradient clipping 1.0; algorithm 1 noises k = 32 pixels a step for T = 60
# steps; algorithm 2 samples in 64 steps (k = 16 pixels a step on 32x32). The network presets
# (series-alg1 / series-alg2) are the 'auto' model of these methods (nets.fit.network_config).
_SERIES = {"lr": 3e-4, "batch_size": 16, "warmup": 63, "grad_clip": 1.0}
# Algorithm 2 in a CPU budget (measured, bench/RESULTS.md "naive2"): the Gaussian recipe's batch 64 and
# lr 1e-3 make its samples more confident than the series' 16 and 3e-4 in the same 8 minutes, and the
# cold-diffusion update with the network told 0.6 of the noise makes them cover all ten digits (the
# series' sampler draws mostly 0s and 8s).
_NAIVE2 = {**_SERIES, "lr": 1e-3, "batch_size": 64, "sample_steps": 64, "cold_update": True, "told_noise": 0.6}
METHOD_DEFAULTS: dict[str, dict[str, Any]] = {
    "gaussian": {},
    "naive1": {**_SERIES, "T": 60, "k": 32},
    "naive2": _NAIVE2,
    "cold": dict(_SERIES),
}
# classifiers learn the class labels (never dropped) and draw no samples (difflab.methods.classification)
CLASSIFIERS = ("noisy-classifier", "classifier")
_CLASSIFIER = {"conditioning": "class", "cond_drop": 0.0, "sample_every": 0, "ema_track": "", "ema_snapshot_every": 0}
METHOD_DEFAULTS.update({name: dict(_CLASSIFIER) for name in CLASSIFIERS})

# --lr 0 (auto): small networks train fastest at 1e-3 in a CPU budget (measured, RESULTS.md); above
# LARGE_NETWORK parameters the DDPM paper's 2e-4 (Ho et al., 35.7M CIFAR-10 net; not measured here)
LR_SMALL, LR_LARGE, LARGE_NETWORK = 1e-3, 2e-4, 5_000_000


def apply_method_defaults(cfg: TrainConfig, given: Iterable[str] | None = None) -> TrainConfig:
    """Set the method's reference settings (METHOD_DEFAULTS) on every field the user did not give.

    ``given``: the fields the user set; by default ``cfg._given``, which ``config_from_args`` records
    (the flags typed). A config without it (built in Python) is taken as fully specified and kept.
    Changes ``cfg`` in place and returns it.
    """
    given = getattr(cfg, "_given", None) if given is None else set(given)
    if given is None:
        return cfg
    for name, value in METHOD_DEFAULTS.get(cfg.method, {}).items():
        if name not in given:
            setattr(cfg, name, value)
    return cfg


@functools.lru_cache(maxsize=1)
def _cpu_flags() -> frozenset[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.partition(":")[2].split())
    except OSError:
        pass
    return frozenset()


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 natively: a GPU that supports it, or a CPU with AVX-512 BF16 or AMX
    (on other CPUs bf16 is emulated, and slower than float32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and bool(_cpu_flags() & {"avx512_bf16", "amx_bf16"})


def resolve(cfg: TrainConfig, device: torch.device, n_params: int) -> TrainConfig:
    """Fill the machine- and network-dependent settings: ``lr`` 0 and ``precision`` auto (in place)."""
    if cfg.lr == 0:
        cfg.lr = LR_LARGE if n_params > LARGE_NETWORK else LR_SMALL
    if cfg.precision == "auto":
        cfg.precision = "bf16" if native_bf16(device) else "fp32"
    return cfg


def describe(cfg: TrainConfig) -> str:
    """The recipe in one line, as a run starts."""
    if cfg.method != "gaussian":
        samples = "" if cfg.method in CLASSIFIERS else f", sampling {cfg.sample_steps} steps"
        if cfg.method == "naive2":
            samples += f"{', cold update' if cfg.cold_update else ''}, told {cfg.told_noise:g} of the noise"
        return (f"recipe: {cfg.method}, lr {cfg.lr:g}, batch {cfg.batch_size}, warm-up {cfg.warmup}, "
                f"{cfg.precision}{samples}")
    ema = (f"power EMA of {cfg.ema_length:g} of the run" if getattr(cfg, "ema_length", 0) > 0
           else f"EMA decay {cfg.ema_decay:g}")
    return (f"recipe: {cfg.process} process, predict {cfg.prediction}, lr {cfg.lr:g} (warm-up {cfg.warmup}), "
            f"batch {cfg.batch_size}, {ema}, {cfg.precision}; sampling {cfg.sampler} {cfg.sample_steps} steps "
            f"down to sigma {cfg.sample_sigma_min if cfg.sample_sigma_min == 'auto' else format(cfg.sample_sigma_min, 'g')}, "
            f"x0 {cfg.clip}{_guided(cfg)}")


# The guidance interval a run samples with when its config says -1 (auto), by conditioning: unconditional
# runs autoguide at 1..20 (measured, bench/RESULTS.md "Defaults"); class and text runs guide at every level
# until an interval is measured for them.
GUIDE_INTERVALS = {"none": (1.0, 20.0), "class": (0.0, math.inf), "text": (0.0, math.inf)}


def guide_interval(cfg: TrainConfig) -> tuple[float, float]:
    """The noise levels (lo, hi) where the run's guidance acts: its guide_sigma_min/max, each -1 taking
    :data:`GUIDE_INTERVALS` of its conditioning."""
    lo, hi = GUIDE_INTERVALS.get(cfg.conditioning, GUIDE_INTERVALS["none"])
    return (lo if cfg.guide_sigma_min == -1 else cfg.guide_sigma_min, hi if cfg.guide_sigma_max == -1 else cfg.guide_sigma_max)


def _guided(cfg: TrainConfig) -> str:
    if cfg.conditioning != "none":
        return f", guidance {cfg.guidance:g}"
    if cfg.autoguidance != 1.0 and cfg.ema_snapshot_every > 0:
        lo, hi = guide_interval(cfg)
        return (f", autoguidance {cfg.autoguidance:g} at sigma {lo:g}..{hi:g} "
                f"(guide: the EMA at {cfg.guide_at:g} of the run)")
    return ""
