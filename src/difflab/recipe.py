"""What a new run gets for the settings it was not given, decided in one place: :func:`build_config` makes
the run's config, once, from what the user gave (flags, a ``--config`` file, ``difflab.train`` keywords).

- Part-1 methods and the classifiers take their reference settings (:data:`METHOD_DEFAULTS`), the flow
  process its own (:data:`PROCESS_DEFAULTS`), on the settings not given.
- The guidance interval (``--guide-sigma-min/max`` -1), APG (``--apg-eta`` -1) and the mean-free update
  (``--guide-keep-mean`` -1) depend on the conditioning (:func:`guide_interval`, :func:`guide_apg`,
  :func:`guide_keep_mean`).
- Gaussian diffusion takes ``TrainConfig``'s own defaults, which are the recipe measured best for a short
  CPU budget (bench/RESULTS.md, "Defaults"), and :func:`resolve` fills the two settings that depend on the
  machine and the network, once it is built: the learning rate (``--lr 0``, auto) and the precision
  (``--precision auto``).

The resolved recipe is printed when a run starts (:func:`describe`) and saved in its config.json.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from difflab.config import PROCESSES, TrainConfig
from difflab.errors import UsageError

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
# Classifiers (difflab.methods.classification) learn the class labels (never dropped), draw no samples and
# track no post-hoc EMAs. They train in fp32 without gradient clipping, AdamW 1e-3 with weight decay 0.05 at
# batch 128 for 2000 steps: the settings of 'difflab train-classifier' (whose flags show these defaults) and of
# 'difflab train --method noisy-classifier' alike.
CLASSIFIERS = ("noisy-classifier", "classifier")
_CLASSIFIER = {"conditioning": "class", "cond_drop": 0.0, "sample_every": 0, "ema_track": "", "ema_snapshot_every": 0,
               "precision": "fp32", "grad_clip": 0.0, "lr": 1e-3, "weight_decay": 0.05, "batch_size": 128,
               "steps": 2000, "keep": 2}
METHOD_DEFAULTS.update({name: dict(_CLASSIFIER) for name in CLASSIFIERS})

# The sampler of unconditional flow runs: DPM-Solver++(2M) SDE, whose fresh noise at each step undoes the colour
# drift of the ODE's (bench/RESULTS.md, "The flow default's sampler"; 20 steps against dpmpp-2m's, 10-minute
# runs): emoji saturation +16% -> +5% of the data's and the largest hue-sixth gap 0.104 -> 0.057 at the same
# KID x 1e3 (36.9, 2,000 samples), textures KID 46.3 -> 44.4, MNIST 0.887 -> 0.920 confident (classifier FID
# 9.1 -> 13.1; another run's 15.0 -> 12.6): TrainConfig's default. Guided class and text runs and the other
# processes keep the ODE's DPM-Solver++(2M) (class and text runs' classifier FID 37.4 and 37.1 -> 49.3 and 50.2
# with the SDE).
FLOW_SAMPLER, ODE_SAMPLER = "dpmpp-2m-sde", "dpmpp-2m"

# What a new Gaussian run of a process gets for the settings it was not given. The flow process (the default)
# learns the velocity at logit-normal training times, TrainConfig's own defaults (SD3, Esser et al. 2024: its gain
# over eps/linear comes from the timestep density). It won on three data sets, 10 CPU minutes each, against the
# cosine process with v prediction at uniform times, the default before (bench/RESULTS.md, "Flow matching as the
# default"): emoji KID x 1e3 36.9 against 53.3, textures 46.3 against 54.2, MNIST (3,076 steps each) 0.879
# confident and classifier FID 15.0 against 0.865 and 21.2. The other processes keep that recipe.
PROCESS_DEFAULTS: dict[str, dict[str, Any]] = {
    name: {"prediction": "v", "noise_sampling": "uniform", "sampler": ODE_SAMPLER} for name in PROCESSES if name != "flow"}
_FIELD_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig)}

# --lr 0 (auto): small networks train fastest at 1e-3 in a CPU budget (measured, RESULTS.md); above
# LARGE_NETWORK parameters the DDPM paper's 2e-4 (Ho et al., 35.7M CIFAR-10 net; not measured here)
LR_SMALL, LR_LARGE, LARGE_NETWORK = 1e-3, 2e-4, 5_000_000


def build_config(values: Mapping[str, Any]) -> TrainConfig:
    """The config of a new run from the settings the user gave (``values``: field -> value, None or absent: not
    given): the given ones, over the method's and the process's defaults (:func:`defaults_for`), over
    TrainConfig's own. A ``--config`` file's keys count as given, like flags. Pure (``values`` is left as it
    is; equal values give equal configs) and checked once, as the config is made; ``lr`` 0 and ``precision``
    auto are left for :func:`resolve`. The one way a config is made from what a user typed, on the command line
    or in ``difflab.train(...)``."""
    given = {k: v for k, v in values.items() if v is not None}
    unknown = sorted(set(given) - set(_FIELD_DEFAULTS))
    if unknown:
        raise UsageError(f"unknown training setting {unknown[0]!r}; the settings are the fields of TrainConfig "
                         "(the flags of 'difflab train' with _ for -)")
    return TrainConfig(**{**defaults_for(given), **given})


def defaults_for(given: Mapping[str, Any]) -> dict[str, Any]:
    """What the settings not in ``given`` become, besides TrainConfig's own defaults: the reference settings of
    the method (:data:`METHOD_DEFAULTS`) and, for Gaussian runs, of the process (:data:`PROCESS_DEFAULTS`;
    :data:`FLOW_SAMPLER`, TrainConfig's own, only for unconditional flow runs)."""
    method = given.get("method", _FIELD_DEFAULTS["method"])
    found = dict(METHOD_DEFAULTS.get(method, {}))
    if method == "gaussian":
        process = given.get("process", _FIELD_DEFAULTS["process"])
        found.update(PROCESS_DEFAULTS.get(process, {}))
        if process == "flow" and given.get("conditioning", _FIELD_DEFAULTS["conditioning"]) != "none":
            found["sampler"] = ODE_SAMPLER
    else:  # the training noise levels are the Gaussian methods' (the flow process's the default); no denoiser's
        found.setdefault("noise_sampling", "uniform")  # sampler: the field as it was
        found.setdefault("sampler", ODE_SAMPLER)
    return found


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
    """``cfg`` with its machine- and network-dependent settings filled: ``lr`` 0 by the network's size
    (``n_params``), ``precision`` auto by the device (a new config; ``cfg`` is left as it is)."""
    lr = (LR_LARGE if n_params > LARGE_NETWORK else LR_SMALL) if cfg.lr == 0 else cfg.lr
    precision = ("bf16" if native_bf16(device) else "fp32") if cfg.precision == "auto" else cfg.precision
    return dataclasses.replace(cfg, lr=lr, precision=precision)


def describe(cfg: TrainConfig) -> str:
    """The recipe in one line, as a run starts."""
    if cfg.method != "gaussian":
        samples = "" if cfg.method in CLASSIFIERS else f", sampling {cfg.sample_steps} steps"
        if cfg.method == "naive2":
            samples += f"{', cold update' if cfg.cold_update else ''}, told {cfg.told_noise:g} of the noise"
        return (f"recipe: {cfg.method}, lr {cfg.lr:g}, batch {cfg.batch_size}, warm-up {cfg.warmup}, "
                f"{cfg.precision}{samples}")
    ema = (f"power EMA of {cfg.ema_length:g} of the run" if cfg.ema_length > 0
           else f"EMA decay {cfg.ema_decay:g}")
    return (f"recipe: {cfg.process} process, predict {cfg.prediction}, lr {cfg.lr:g} (warm-up {cfg.warmup}), "
            f"batch {cfg.batch_size}, {ema}, {cfg.precision}; sampling {cfg.sampler} {cfg.sample_steps} steps "
            f"down to sigma {cfg.sample_sigma_min if cfg.sample_sigma_min == 'auto' else format(cfg.sample_sigma_min, 'g')}, "
            f"x0 {cfg.clip}{_guided(cfg)}")


# The bottom of a guidance interval that guides every level of the sampler's grid but its last, the one that
# gives the final image: it stands for "just above the run's sigma_min" (above_grid_bottom) until the run's
# sampling defaults are made (Method.sampling_defaults, which knows the run's grid bottom).
ABOVE_GRID_BOTTOM = -2.0


def above_grid_bottom(sigma_min: float | None) -> float:
    """The bottom of a guidance interval that holds every level above the grid's bottom ``sigma_min`` but not the
    bottom itself (the sampler's last level); 1.0, the interval's bottom before, when the grid's is unknown."""
    return 1.0 if sigma_min is None else float(sigma_min) * (1 + 1e-6)
# The guidance interval a run samples with when its config says -1 (auto), by conditioning: unconditional runs
# autoguide at every level up to 20 but the grid's last (with the update's mean kept, below: textures KID x 1e3
# 82.8 -> 53.1 against 1..20, MNIST 0.873 -> 0.883 confident; guiding the last level too: textures 78.5;
# bench/RESULTS.md "Mean-free guidance"); class runs guide at 1..10 (classifier FID 39.7 against 59.1 guided
# everywhere, every digit still the asked-for one; narrower intervals lower FID further but miss a digit:
# bench/RESULTS.md "Issues 23, 24 and 26, second session"; a flow class run: 37.4 against 56.4); text runs too
# (a 10-minute MNIST text run: 37.1 against 57.6, 999 of 1,000 the asked-for digit against 1,000; bench/RESULTS.md
# "Guidance of class and text runs").
GUIDE_INTERVALS = {"none": (ABOVE_GRID_BOTTOM, 20.0), "class": (1.0, 10.0), "text": (1.0, 10.0)}


def guide_interval(cfg: TrainConfig) -> tuple[float, float]:
    """The noise levels (lo, hi) where the run's guidance acts: its guide_sigma_min/max, each -1 taking
    :data:`GUIDE_INTERVALS` of its conditioning (lo may be :data:`ABOVE_GRID_BOTTOM`; 1 when the update does not
    keep the mean, as in runs saved before :func:`guide_keep_mean` existed)."""
    lo, hi = GUIDE_INTERVALS.get(cfg.conditioning, GUIDE_INTERVALS["none"])
    if lo == ABOVE_GRID_BOTTOM and not guide_keep_mean(cfg):
        lo = 1.0  # measured with the mean kept; a plain update keeps the interval it was measured with, 1..20
    return (lo if cfg.guide_sigma_min == -1 else cfg.guide_sigma_min, hi if cfg.guide_sigma_max == -1 else cfg.guide_sigma_max)


# Whether the guidance update loses its per-image mean (GuidanceRule's keep_mean) when the config says -1, by
# conditioning: autoguidance keeps the network's colours with it (textures: the largest hue-sixth gap 0.30 -> 0.07,
# brightness +9% -> 0%, KID x 1e3 82.8 -> 74.5 at the same interval; MNIST unchanged: 0.869 -> 0.873 confident,
# classifier FID 20.5 -> 20.0; bench/RESULTS.md "Mean-free guidance"); classifier-free guidance keeps its plain
# update until measured (a class may rightly differ from another in mean brightness).
GUIDE_KEEP_MEAN = {"none": True, "class": False, "text": False}


def guide_keep_mean(cfg: TrainConfig) -> bool:
    """Whether the run's guidance keeps each image's mean (its guide_keep_mean; -1: :data:`GUIDE_KEEP_MEAN`)."""
    return GUIDE_KEEP_MEAN.get(cfg.conditioning, False) if cfg.guide_keep_mean == -1 else bool(cfg.guide_keep_mean)


# APG's eta a run samples with when its config says -1 (auto), by conditioning: autoguidance (unconditional runs)
# projects the parallel part away, which keeps the data's colours on textures at no cost on MNIST (bench/RESULTS.md
# "Guidance on colour data"); classifier-free guidance stays plain until measured. 1: plain guidance.
GUIDE_APG = {"none": 0.0, "class": 1.0, "text": 1.0}


def guide_apg(cfg: TrainConfig) -> float | None:
    """APG's eta of the run's guidance (its apg_eta, -1 taking :data:`GUIDE_APG` of its conditioning); None
    when it is 1, plain guidance."""
    eta = GUIDE_APG.get(cfg.conditioning, 1.0) if cfg.apg_eta == -1 else cfg.apg_eta
    return None if eta == 1 else eta


def _guided(cfg: TrainConfig) -> str:
    if cfg.conditioning != "none":
        return f", guidance {cfg.guidance:g}"
    if cfg.autoguidance != 1.0 and cfg.ema_snapshot_every > 0:
        lo, hi = guide_interval(cfg)
        apg = "" if guide_apg(cfg) is None else f", APG eta {guide_apg(cfg):g}"
        mean = ", keeping each image's mean" if guide_keep_mean(cfg) else ""
        where = f"sigma above the grid's bottom up to {hi:g}" if lo == ABOVE_GRID_BOTTOM else f"sigma {lo:g}..{hi:g}"
        return (f", autoguidance {cfg.autoguidance:g} at {where} "
                f"(guide: the EMA at {cfg.guide_at:g} of the run){apg}{mean}")
    return ""
