"""The single source of truth for a training run: one frozen dataclass, valid by construction, saved as JSON
beside the weights; the ``difflab train`` flags are derived from its fields. What a new run gets for the
settings it was not given is :mod:`difflab.recipe`'s (which imports this module; this one never imports it)."""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from difflab.checks import DEVICE, MAX_SEED, check_range
from difflab.ema_lengths import check_ema_length, parse_lengths
from difflab.errors import CheckpointError, UsageError

METHODS = ("gaussian", "naive1", "naive2", "cold", "noisy-classifier", "classifier", "consistency")
CLASS_LEARNERS = ("gaussian", "noisy-classifier", "classifier")  # the methods that take class labels
PROCESSES = ("linear", "cosine", "sigmoid", "constant", "vp", "vp-cosine", "ve", "flow")
CONDITIONING = ("none", "class", "text")


def _option(default, help: str, choices=None, **kw):
    """A TrainConfig field that is also a ``difflab train`` flag: its default, help text and choices."""
    return field(default=default, metadata={"help": help, "choices": choices, **kw})


def _sigma_or_auto(text: str) -> float | str:
    """``--sample-sigma-min``: 'auto' or a number."""
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be auto or a noise level, got '{text}'") from None


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run. Checked as it is made (:meth:`validate`, a UsageError naming the
    flag), and never changed afterwards: a changed config is a new one (``dataclasses.replace``)."""

    data: str = _option("mnist", "dataset: mnist, fashion-mnist, digits, emoji, or a folder of images")
    out: str = _option("runs/demo", "run folder (checkpoints, samples, loss curve)")
    method: str = _option("gaussian", "gaussian (DDPM and continuous time), naive1/naive2 (part 1), cold; noisy-classifier "
                   "(for classifier guidance), classifier (clean images, for evaluation); consistency (ECT, as "
                   "'difflab distill' tunes a run)", METHODS)
    degradation: str = _option("fade-colour", "cold diffusion: fade-colour, fade-black, mask, blur, pixelate")
    process: str = _option("flow", "Gaussian noise process: flow (rectified flow: z_t = (1 - t) x + t s, the default: "
                      "predicts the velocity and trains at logit-normal times unless told), discrete schedules "
                      "linear/cosine/sigmoid/constant, continuous vp/vp-cosine/ve (these predict v and train at "
                      "uniform times unless told)", PROCESSES)
    T: int = _option(1000, "number of discrete steps (naive1: noising steps, default 60 there)")
    gamma: float = _option(0.9, "per-step gamma of the constant schedule")
    k: int = _option(32, "naive1: pixels noised per step")
    replace: bool = _option(True, "naive1: pixels may be picked again in later steps (--no-replace walks a "
                       "random order, so T*k must not exceed the pixel count)")
    prediction: str = _option("velocity", "what the network predicts: eps, x0, v, zprev (series v1), edm, velocity "
                         "(s - x, flow matching's target; the default of --process flow; v for the other processes)",
                         ("eps", "x0", "v", "zprev", "edm", "velocity"))
    model: str = _option("auto", "network preset (see difflab.nets.presets) or 'auto' for the method's default")
    channels_mult: str = _option("", "override the UNet's channels, e.g. '32,64,64' (CoordConv: its widths)")
    dropout: float = _option(-1.0, "dropout (-1: the preset's)")
    conditioning: str = _option("none", "condition on nothing, class labels, or text captions", CONDITIONING)
    cond_drop: float = _option(0.1, "probability of dropping the condition (classifier-free guidance)")
    image_size: int = _option(0, "resize images to this size (0: native; MNIST is padded to 32)")
    image_channels: int = _option(0, "1 or 3 image channels (0: the dataset's)")
    steps: int = _option(10_000, "optimiser steps")
    time_limit: float = _option(0.0, "stop by itself after this many minutes, save, and be ready to sample")
    batch_size: int = _option(64, "global batch size (split over ranks; times --grad-accum micro-batches)")
    grad_accum: int = _option(1, "micro-batches per optimiser step")
    lr: float = _option(0.0, "AdamW learning rate (0: auto, by network size: 1e-3 below 5M parameters, 2e-4 above)")
    weight_decay: float = _option(0.0, "AdamW weight decay")
    warmup: int = _option(100, "learning-rate warm-up steps")
    lr_decay: str = _option("none", "after warm-up: none or cosine", ("none", "cosine"))
    grad_clip: float = _option(1.0, "gradient-norm clipping (0: off)")
    ema_decay: float = _option(0.999, "EMA decay of the weights (with warm-up (1+n)/(10+n)), used with --ema-length 0")
    # --- training recipes: EDM2's power EMA and post-hoc EMA, EDM's noise levels, loss weightings ---
    ema_length: float = _option(0.05, "the main EMA: EDM2's power-function EMA whose length (relative std sigma_rel) is "
                           "this fraction of the run; 0: the classic EMA of --ema-decay")
    ema_track: str = _option("0.05,0.1", "power EMAs (comma-separated sigma_rel) tracked and snapshotted for "
                        "post-hoc EMA ('difflab ema'); '' for none")
    ema_snapshot_every: int = _option(200, "steps between snapshots of the --ema-track EMAs in RUN/ema-snapshots (0: none)")
    noise_sampling: str = _option("logit-normal", "training noise levels: logit-normal (SD3: log(sigma_flow / (1 - "
                             "sigma_flow)) ~ N(--logit-mean, --logit-std^2), the flow process's default), uniform in t "
                             "(the other processes' default), or lognormal (EDM: log sigma ~ N(-1.2, 1.2^2), mapped to "
                             "t; discrete schedules round t to a step)", ("uniform", "lognormal", "logit-normal"))
    logit_mean: float = _option(0.0, "mean of --noise-sampling logit-normal (SD3: 0)")
    logit_std: float = _option(1.0, "std of --noise-sampling logit-normal (SD3: 1)")
    time_shift: float = _option(1.0, "resolution shift of the training noise levels: sigma_ve times this (on the flow "
                           "process SD3's t' = shift t / (1 + (shift - 1) t)); 1: none")
    loss_weighting: str = _option("none", "per-sample loss weight: none (plain MSE of the network output), min-snr "
                             "(Hang et al.: min(SNR, gamma) on the x0 error) or edm ((sigma^2 + sigma_data^2) / "
                             "(sigma sigma_data)^2 on the x0 error)", ("none", "min-snr", "edm"))
    min_snr_gamma: float = _option(5.0, "gamma of --loss-weighting min-snr")
    precision: str = _option("auto", "auto (bf16 autocast where the GPU or CPU computes bf16 natively: AVX-512 BF16 "
                                "or AMX; else fp32), fp32 or bf16", ("auto", "fp32", "bf16"))
    compile: bool = _option(False, "torch.compile the network")
    seed: int = _option(0, "seed of the whole run (data order, noise, initial weights)")
    hflip: bool = _option(False, "random horizontal flips (off for digits)")
    # a folder's labels and pixels (issue 23)
    labels: bool = _option(False, "classes from a folder's first-level sub-folders (also with --conditioning class; "
                           "labels in a metadata.jsonl are always read)")
    background: str = _option("white", "the colour transparent pixels of a folder's images become", ("white", "black"))
    crop: float = _option(0.0, "random crops: decode images at (1 + crop) times the run's size and crop each sample "
                          "back to it, at offsets fixed by the seed and step (0: off)")
    log_every: int = _option(50, "steps between loss logs (the only host-device syncs)")
    logger: str = _option("csv", "where the logs go besides loss.csv: csv (nothing else) or tensorboard (loss, lr, "
                     "images/s and sample grids as events in RUN/tensorboard; pip install 'difflab[tensorboard]')",
                     ("csv", "tensorboard"))
    sample_every: int = _option(1000, "steps between sample grids (0: only at the end)")
    sampler: str = _option("dpmpp-2m-sde", "the sampler 'difflab sample' and the periodic grids use unless told otherwise")
    sample_steps: int = _option(20, "sampler steps of 'difflab sample' and the periodic grids")
    guidance: float = _option(3.0, "classifier-free guidance scale g that class/text runs sample with unless told "
                         "(g = 1 + w; 1: plain conditional sampling)")
    autoguidance: float = _option(3.0, "autoguidance scale w that unconditional runs sample with unless told: "
                                  "D_guide + w (D - D_guide), the guide being this run's EMA from --guide-at of "
                                  "training (Karras et al. 2024); 1: off")
    guide_at: float = _option(0.25, "where the autoguidance guide is taken from: the EMA snapshot nearest this "
                              "fraction of the run (at most 0.5)")
    guide_sigma_min: float = _option(-1.0, "guidance (classifier-free and autoguidance) only at noise levels sigma >= "
                                     "this (VE units; 0: from the bottom; -1: the run's kind's, recipe.guide_interval)")
    guide_sigma_max: float = _option(-1.0, "guidance only at noise levels sigma <= this (VE units; above, the network "
                                     "alone: one evaluation a step; -1: the run's kind's, recipe.guide_interval)")
    apg_eta: float = _option(-1.0, "APG (Sadat et al. 2025) on the run's guidance: the weight of the guidance update's "
                             "part parallel to the network's estimate (0: projected away, which keeps the data's "
                             "colours; 1: plain guidance); -1: the run's kind's (recipe.guide_apg)")
    guide_keep_mean: int = _option(-1, "remove the guidance update's mean over each image, per channel, so guidance "
                                   "keeps the network's colour balance (1: on, 0: off; -1: the run's kind's, "
                                   "recipe.guide_keep_mean)")
    cold_update: bool = _option(False, "naive2: sample with the cold-diffusion update (pixels revealed keep their "
                                "value; --no-cold-update: fresh random pixels every step, as in the series)")
    told_noise: float = _option(1.0, "naive2: the fraction of the noised pixels the network is told of while sampling "
                                "(1: the truth; below 1 its samples differ more)")
    sample_sigma_min: float | str = _option("auto", "the lowest noise level of the karras and geometric sampling grids "
                                            "(VE units): the last step denoises from there; 0: the process's own; auto: "
                                            "where the EMA denoiser's x0 error falls below 0.04 of the data variance, "
                                            "measured when training ends (difflab.runs.grid_bottom; 0.5 until then)",
                                            parse=_sigma_or_auto)
    clip: str = _option("clip", "x0 estimates while sampling: clip to the data range, dynamic (Imagen's thresholding) "
                   "or none", ("none", "clip", "dynamic"))
    # --- evaluation during training (difflab.evaluate.during_training) ---
    eval_every: int = _option(-1, "steps between KID/FID evaluations of EMA samples against the training data's "
                              "cached Inception features (loss.csv, TensorBoard, the explorer's monitor); -1: auto (on "
                              "when it costs at most about 5 percent of the run's budget), 0: off")
    eval_metric: str = _option("kid", "what --eval-every computes: kid or fid", ("kid", "fid"))
    eval_n: int = _option(256, "samples per evaluation during training")
    checkpoint_every: int = _option(1000, "steps between checkpoints")
    keep: int = _option(3, "checkpoints kept")
    device: str = _option("auto", "auto, cpu, cuda or cuda:N")

    # --- validated ------------------------------------------------------------------------------
    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> TrainConfig:
        """``self``, after the checks every config passes when it is made: choices, ranges and the
        combinations of settings that cannot train (a UsageError naming the flag)."""
        for f in fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise UsageError(f"--{_flag(f.name)} must be one of {', '.join(choices)}, got {getattr(self, f.name)!r}")
        for name, (lo, hi, *opts) in _RANGES.items():
            check_range(f"--{_flag(name)}", getattr(self, name), lo, hi, **(opts[0] if opts else {}))
        if self.sample_sigma_min != "auto":
            if isinstance(self.sample_sigma_min, str):
                raise UsageError(f"--sample-sigma-min must be auto or a noise level, got '{self.sample_sigma_min}'")
            check_range("--sample-sigma-min", self.sample_sigma_min, 0, 80, open_hi=True)
        if self.dropout != -1:
            check_range("--dropout", self.dropout, 0, 1, open_hi=True)
        for name in ("guide_sigma_min", "guide_sigma_max"):
            if getattr(self, name) != -1:
                check_range(f"--{_flag(name)}", getattr(self, name), 0, 1e9)
        if self.apg_eta != -1:
            check_range("--apg-eta", self.apg_eta, 0, 1)
        if self.guide_keep_mean not in (-1, 0, 1):
            raise UsageError(f"--guide-keep-mean must be -1 (the run's kind's), 0 or 1, got {self.guide_keep_mean!r}")
        if self.channels_mult:
            channel_widths(self.channels_mult)
        if not DEVICE.fullmatch(self.device):
            raise UsageError(f"--device must be auto, cpu, cuda or cuda:N, got '{self.device}'")
        if not self.out.strip():
            raise UsageError("--out must name a folder")
        from difflab.samplers import SAMPLERS  # (samplers import nothing of the run layer)

        if self.sampler not in SAMPLERS:
            raise UsageError(f"--sampler must be one of {', '.join(SAMPLERS)}, got {self.sampler!r}")
        if self.ema_length != 0:
            check_ema_length(self.ema_length)
        parse_lengths(self.ema_track)
        if self.ema_snapshot_every < 0:
            raise UsageError(f"--ema-snapshot-every must be 0 (off) or a number of steps, got {self.ema_snapshot_every}")
        # (other methods ignore the field at its default as at uniform, the value 'difflab.recipe' gives them)
        if self.method != "gaussian" and (self.noise_sampling not in ("uniform", _NOISE_SAMPLING)
                                          or self.loss_weighting != "none" or self.time_shift != 1):
            raise UsageError("--noise-sampling, --time-shift and --loss-weighting apply to --method gaussian")
        if self.process == "flow" and self.prediction in ("eps", "zprev") and self.method == "gaussian":
            raise UsageError(f"--process flow cannot take --prediction {self.prediction}: its sampling starts at t = 1, "
                             "where the noise alone gives no image estimate; use velocity (its default), v, x0 or edm")
        if self.image_channels not in (0, 1, 3):
            raise UsageError(f"--image-channels must be 1 or 3, got {self.image_channels}")
        if self.conditioning != "none" and self.method not in CLASS_LEARNERS:
            raise UsageError("conditioning (class/text) is available for --method gaussian")
        if self.batch_size % self.grad_accum:
            raise UsageError("--batch-size must be divisible by --grad-accum")
        return self

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def check_types(cls, d: Any) -> None:
        """TypeError naming the first key of ``d`` (a JSON object) whose value has the wrong type (or is null)."""
        if not isinstance(d, dict):
            raise TypeError("not a JSON object")
        types = {f.name: str(f.type) for f in fields(cls)}
        kinds = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,), "float | str": (int, float, str)}
        for k, v in d.items():
            ok = kinds.get(types.get(k, ""))  # fields of other types (none yet) are not checked here
            if ok and (not isinstance(v, ok) or (isinstance(v, bool) and types[k] != "bool")):
                raise TypeError(f"'{k}' is {json.dumps(v)}, not a {types[k]}")

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> TrainConfig:
        """The config saved as JSON; a value of the wrong type (or null) is a TypeError naming the key."""
        cls.check_types(d)
        names = {f.name for f in fields(cls)}
        return cls(**{**LEGACY_DEFAULTS, **{k: v for k, v in d.items() if k in names}})


# (lo, hi[, options]) of every numeric field; sizes are bounded so that no absurd value reaches an allocation
_RANGES: dict[str, tuple] = {
    "T": (1, 1_000_000), "gamma": (0, 1, {"open_lo": True, "open_hi": True}), "k": (1, 1 << 24),
    "cond_drop": (0, 1, {"open_hi": True}), "image_size": (0, 4096), "crop": (0, 1), "steps": (1, 10**10),
    "time_limit": (0, 10**7), "batch_size": (1, 1 << 16), "grad_accum": (1, 1 << 12),
    "lr": (0, 1, {"open_hi": True}), "guidance": (-100, 100), "autoguidance": (0, 100),
    "guide_at": (0, 0.5, {"open_lo": True}), "weight_decay": (0, None), "warmup": (0, 10**10),
    "grad_clip": (0, None), "ema_decay": (0, 1, {"open_hi": True}), "seed": (0, MAX_SEED),
    "log_every": (1, 10**6), "sample_every": (0, 10**10), "sample_steps": (1, 100_000),
    "checkpoint_every": (1, 10**10), "keep": (1, 10_000), "ema_snapshot_every": (0, 10**10),
    "min_snr_gamma": (0, 1e6, {"open_lo": True}),
    "told_noise": (0, 1, {"open_lo": True}),
    "eval_every": (-1, 10**10), "eval_n": (2, 100_000),
    "logit_mean": (-10, 10), "logit_std": (0, 10, {"open_lo": True}), "time_shift": (0.01, 100),
}


def process_config(cfg: TrainConfig) -> dict[str, Any]:
    """The Gaussian process a run trains with, as a config dict."""
    if cfg.process in ("vp", "vp-cosine", "ve", "flow"):
        return {"kind": cfg.process}
    params: dict[str, Any] = {"T": cfg.T}
    if cfg.process == "constant":
        params["gamma"] = cfg.gamma
    return {"kind": "discrete", "schedule": cfg.process, **params}


def channel_widths(text: str) -> list[int]:
    """``--channels-mult`` '32,64,64' as positive widths (1 to 8 levels, each at most 4096)."""
    try:
        widths = [int(c) for c in text.split(",")]
    except ValueError:
        raise UsageError(f"--channels-mult takes comma-separated integers, got '{text}'") from None
    if not 1 <= len(widths) <= 8 or not all(1 <= w <= 4096 for w in widths):
        raise UsageError(f"--channels-mult takes 1 to 8 widths from 1 to 4096, got '{text}'")
    return widths


_NOISE_SAMPLING = next(f.default for f in fields(TrainConfig) if f.name == "noise_sampling")

# What a field missing from a saved run's config.json means: the behaviour from before it existed
LEGACY_DEFAULTS: dict[str, Any] = {"ema_length": 0.0, "ema_track": "", "ema_snapshot_every": 0, "autoguidance": 1.0,
                                   "guide_sigma_min": 0.0, "guide_sigma_max": 1e9, "apg_eta": 1.0, "guide_keep_mean": 0,
                                   "sample_sigma_min": 0.0, "eval_every": 0,
                                   "process": "cosine", "prediction": "v", "noise_sampling": "uniform",
                                   "sampler": "dpmpp-2m"}


def _flag(name: str) -> str:
    return name.replace("_", "-")


def add_config_arguments(parser: argparse.ArgumentParser, names: Collection[str] | None = None,
                         defaults: Mapping[str, Any] | None = None) -> None:
    """One flag per field of TrainConfig (of ``names``, or every one), with its type, help and the default it
    shows (``defaults``' value, else the field's); the parsed default is None, so :func:`flags_given` can tell
    the flags typed (a method's defaults fill only the others; a resumed run may change only some)."""
    for f in fields(TrainConfig):
        if names is not None and f.name not in names:
            continue
        flag = "--" + _flag(f.name)
        help_text = f"{f.metadata.get('help', '')} (default: {(defaults or {}).get(f.name, f.default)})"
        if f.type in ("bool", bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            typ = f.metadata.get("parse") or {"int": int, "float": float, "str": str}.get(str(f.type), str)
            parser.add_argument(flag, type=typ, default=None, help=help_text, metavar=f.name.upper()
                                if typ is not str else None, choices=f.metadata.get("choices"))


def read_config_file(path: str | Path) -> dict[str, Any]:
    """``difflab train --config FILE``: a saved config.json, or part of one, checked (a UsageError names
    unknown keys or a value of the wrong type; choices and ranges are checked with the flags')."""
    try:
        d = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UsageError(f"--config {path} cannot be read as JSON ({e})") from None
    try:
        TrainConfig.check_types(d)
    except TypeError as e:
        raise UsageError(f"--config {path}: {e}") from None
    unknown = sorted(set(d) - {f.name for f in fields(TrainConfig)})
    if unknown:
        raise UsageError(f"--config {path}: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}")
    return d


def flags_given(args: argparse.Namespace, names: Collection[str] | None = None) -> dict[str, Any]:
    """The settings typed as flags (:func:`add_config_arguments`; None: not typed), of ``names`` or of
    every field."""
    return {f.name: v for f in fields(TrainConfig) if (names is None or f.name in names)
            and (v := getattr(args, f.name, None)) is not None}


def save_json(path: Path, obj: Any) -> None:
    """Write JSON atomically (temporary file, then rename)."""
    from difflab.files import write_text

    write_text(path, json.dumps(obj, indent=2, sort_keys=True, allow_nan=False))


def load_run_config(run: str | Path) -> TrainConfig:
    p = Path(run) / "config.json"
    if not Path(run).is_dir():
        raise CheckpointError(f"run folder '{run}' does not exist: give the --out folder of a 'difflab train' run")
    if not p.exists():
        raise CheckpointError(f"'{run}' has no config.json: is it a difflab run folder?")
    try:
        return TrainConfig.from_json(json.loads(p.read_text()))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, TypeError, UsageError) as e:
        raise CheckpointError(f"{p} is corrupt ({e}); restore it or start a new run") from e
