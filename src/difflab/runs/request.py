"""What to sample, checked in one place: :class:`SampleRequest` is the one sampling request of the CLI
(``difflab sample``), the web explorer and the Python API.

A request is built from plain values and checks them at once (NaN, infinities, negative and absurd sizes,
before anything is allocated); :meth:`SampleRequest.resolve` then checks it against the model it will
run on (:class:`ModelTraits`: its method, conditioning and classes) and fills what was not given from
the model's own sampling defaults. Every bad value is a :class:`~difflab.errors.UsageError` with one
line naming the ``difflab sample`` flag.

>>> req = SampleRequest(n=4, seed=1, steps=10)
>>> req.resolve(ModelTraits("gaussian", True, "class", 10, (1, 8, 8), {"sampler": "ddim"})).label_tensor()
tensor([0, 1, 2, 3])
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from difflab.checks import MAX_SAMPLES, MAX_SEED, check_array, check_values
from difflab.errors import UsageError
from difflab.samplers import SPACINGS

MAX_STEPS = 100_000
MAX_BATCH = 1 << 16
MAX_PROMPT = 10_000  # characters; text encoders read far fewer
CLIPS = ("none", "clip", "dynamic")
PRECISIONS = ("fp32", "bf16")
CHOICES = {"clip": CLIPS, "precision": PRECISIONS, "variance": ("small", "large"),
           "spacing": SPACINGS}
# passed on to the sampler when given
SAMPLER_OPTIONS = ("eta", "order", "variance", "spacing", "sigma_min", "churn", "lower_order_final")
FLAGS = {"n": "--n", "seed": "--seed", "start": "--start", "steps": "--steps", "eta": "--eta", "churn": "--churn",
         "order": "--order", "guidance": "--guidance", "autoguidance": "--autoguidance", "classifier_scale": "--classifier-scale",
         "batch_size": "--batch-size", "labels": "--class", "clip": "--clip", "precision": "--precision",
         "variance": "--variance", "spacing": "--spacing", "sampler": "--sampler", "prompt": "--prompt",
         "sigma_min": "--sigma-min", "guide_sigmas": "--guide-sigmas", "told_noise": "--told-noise",
         "guidance_rescale": "--guidance-rescale", "apg_eta": "--apg-eta", "apg_threshold": "--apg-threshold",
         "apg_momentum": "--apg-momentum", "guide_keep_mean": "--guide-keep-mean"}
# how guidance mixes (GuidanceRule)
GUIDANCE_RULE = ("guidance_rescale", "apg_eta", "apg_threshold", "apg_momentum", "guide_keep_mean")


@dataclass(frozen=True)
class ModelTraits:
    """What a request is checked against, known without loading weights (a run's JSON files do)."""

    method: str  # gaussian, naive1, naive2, cold (for messages)
    conditional: bool  # the method takes labels, prompts and guidance (Gaussian runs)
    conditioning: str  # none, class, text
    num_classes: int  # of a class or text run (text: one caption set per class), or a class-conditional UNet
    shape: tuple[int, int, int] | None
    defaults: dict = field(default_factory=dict)  # sampler, steps, clip, guidance it samples with unless told
    guidable: bool = True  # has a null condition (classifier-free guidance); a diffusers UNet has none
    classifier_guidance: bool = True  # can be steered by a noisy classifier (difflab runs)
    autoguidable: bool = False  # has a weaker version of itself to guide with (difflab runs' early EMA snapshots)


@dataclass(frozen=True, eq=False)
class SampleRequest:
    """Samples ``start .. start + n - 1`` of ``seed`` from ``run``; None fields take the model's defaults.

    ``labels``: one class index for every sample, or one per sample; with neither labels nor a
    ``prompt``, class runs cycle through their classes. ``init_noise``: float [>= n, C, H, W] starting
    noise in standard-normal units, row j for sample ``start + j``. ``classifier``: a noisy classifier
    (its run folder, or a loaded one) for classifier guidance with ``classifier_scale``. ``autoguidance``:
    the scale w of D_guide + w (D - D_guide), the guide being the run's EMA from early in training.
    ``guide_sigmas`` (lo, hi): the noise levels where classifier-free guidance and autoguidance act (the
    guidance interval). ``guidance_rescale`` (phi in [0, 1]) and APG (``apg_eta`` in [0, 1], the weight of the
    update's part parallel to the conditional estimate; ``apg_threshold``, the cap on its norm; ``apg_momentum``
    in (-1, 1)) and ``guide_keep_mean`` (the update's per-channel image mean removed: each image keeps the
    unguided estimate's mean colour) change how both make the guided estimate
    (:class:`~difflab.guidance.GuidanceRule`).
    ``sigma_min``: the bottom of the karras and geometric grids.
    ``precision`` bf16 runs the network with bf16 weights (converted in place)."""

    run: str | Path | None = None
    n: int = 64
    seed: int = 0
    start: int = 0
    sampler: str | None = None
    steps: int | None = None
    guidance: float | None = None
    autoguidance: float | None = None
    guide_sigmas: tuple[float, float] | None = None
    guidance_rescale: float | None = None
    apg_eta: float | None = None
    apg_threshold: float | None = None
    apg_momentum: float | None = None
    guide_keep_mean: bool | None = None
    labels: int | Sequence[int] | torch.Tensor | None = None
    prompt: str | None = None
    init_noise: torch.Tensor | None = None
    clip: str | None = None
    eta: float | None = None
    order: int | None = None
    variance: str | None = None
    spacing: str | None = None
    sigma_min: float | None = None
    churn: float | None = None
    lower_order_final: bool | None = None  # unipc: diffusers' rule, the predictor's order at most the steps left
    cold_update: bool | None = None
    told_noise: float | None = None
    classifier: Any = None
    classifier_scale: float = 1.0
    classifier_sigma_max: float | None = None
    batch_size: int = 256
    precision: str = "fp32"

    @classmethod
    def of(cls, **settings: Any) -> SampleRequest:
        """A request from keyword settings (Python callers): an unknown name is a UsageError, not a TypeError."""
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(settings) - set(names))
        if unknown:
            raise UsageError(f"unknown sampling setting {unknown[0]!r}; choose from {', '.join(names)}")
        return cls(**settings)

    def __post_init__(self) -> None:
        self._check_numbers()
        self._check_choices()
        if self.labels is not None:
            object.__setattr__(self, "labels", _labels(self.labels, self.n))
        if self.prompt is not None and (not isinstance(self.prompt, str) or not 0 < len(self.prompt) <= MAX_PROMPT):
            raise UsageError(f"--prompt must be text of 1 to {MAX_PROMPT} characters")
        if self.init_noise is not None:
            object.__setattr__(self, "init_noise", _noise(self.init_noise, self.n))

    def _check_numbers(self) -> None:
        check_values({"--n": (self.n, 1, MAX_SAMPLES), "--seed": (self.seed, 0, MAX_SEED),
                      "--start": (self.start, 0, MAX_SEED), "--steps": (self.steps, 1, MAX_STEPS),
                      "--eta": (self.eta, 0, 1), "--churn": (self.churn, 0, None), "--order": (self.order, 1, 3),
                      "--guidance": (self.guidance, None, None), "--autoguidance": (self.autoguidance, 0, 100),
                      "--classifier-scale": (self.classifier_scale, None, None),
                      "--batch-size": (self.batch_size, 1, MAX_BATCH),
                      "--sigma-min": (self.sigma_min, 0, 80, {"open_hi": True}),
                      "--told-noise": (self.told_noise, 0, 1, {"open_lo": True}),
                      "--classifier-sigma-max": (self.classifier_sigma_max, 0, None,
                                                 {"open_lo": True, "allow_inf": True}),
                      "--guidance-rescale": (self.guidance_rescale, 0, 1), "--apg-eta": (self.apg_eta, 0, 1),
                      "--apg-threshold": (self.apg_threshold, 0, None, {"open_lo": True, "allow_inf": True}),
                      "--apg-momentum": (self.apg_momentum, -1, 1, {"open_lo": True, "open_hi": True})})
        if self.apg_eta is None and (self.apg_threshold is not None or self.apg_momentum is not None):
            raise UsageError("--apg-threshold and --apg-momentum are options of APG: give --apg-eta too (0: the "
                             "paper's, only the orthogonal part of the update)")
        for name in ("lower_order_final", "guide_keep_mean"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, bool):
                raise UsageError(f"{name} must be True or False, got {value!r}")
        if self.guide_sigmas is not None:
            lo, hi = _pair(self.guide_sigmas)
            object.__setattr__(self, "guide_sigmas", (lo, hi))
        for name in ("n", "seed", "start", "steps", "order", "batch_size"):
            value = getattr(self, name)
            if value is not None and value != int(value):
                raise UsageError(f"{FLAGS[name]} must be a whole number, got {value}")

    def _check_choices(self) -> None:
        from difflab.samplers import SAMPLERS

        for name, choices in {**CHOICES, "sampler": tuple(SAMPLERS)}.items():
            value = getattr(self, name)
            if value is not None and value not in choices:
                raise UsageError(f"{FLAGS[name]} must be one of {', '.join(choices)}, got {value!r}")

    def resolve(self, model: ModelTraits) -> SampleRequest:
        """This request checked against ``model``, with the model's defaults for the settings not given and,
        on conditional runs without labels or a prompt, the classes in turn (:func:`cycled_labels`; a text
        run draws each class's first caption)."""
        self._check_condition(model)
        if self.init_noise is not None and model.shape is not None and \
                tuple(self.init_noise.shape[1:]) != tuple(model.shape):
            raise UsageError(f"--init-noise has images of shape {list(self.init_noise.shape[1:])}; this model "
                             f"draws {list(model.shape)}")
        filled = {k: v for k, v in model.defaults.items() if getattr(self, k) is None}
        if self.labels is None and self.prompt is None and model.conditioning != "none":
            filled["labels"] = cycled_labels(self.start, self.n, model.num_classes)
        return dataclasses.replace(self, **filled)

    def _check_condition(self, model: ModelTraits) -> None:
        """Condition settings that cannot work with ``model`` fail before any sampling starts."""
        kind, k = model.conditioning, model.num_classes
        guided = self.guidance is not None and self.guidance != 1.0
        lo, hi = (int(self.labels.min()), int(self.labels.max())) if self.labels is not None else (0, 0)
        if kind != "none" and (lo < 0 or hi >= k):
            raise UsageError(f"--class must be in 0..{k - 1} for this run, got {lo if lo < 0 else hi}")
        if lo < 0:
            raise UsageError(f"--class must not be negative, got {lo}")
        if self.prompt is not None and kind != "text":
            raise UsageError("--prompt needs a run trained with --conditioning text")
        if guided and (kind == "none" or not model.guidable):
            raise UsageError("--guidance needs a run trained with --conditioning class|text (for an unconditional "
                             "run use --classifier with --classifier-scale)")
        if self.autoguidance is not None and self.autoguidance != 1.0 and not model.autoguidable:
            raise UsageError("--autoguidance needs a Gaussian difflab run with EMA snapshots from early in training (train "
                             "with --ema-snapshot-every below half the steps); this model has none")
        if self.classifier is not None and not model.classifier_guidance:
            raise UsageError("--classifier (classifier guidance) needs a difflab run (--run)")
        if self.labels is not None and kind == "none" and self.classifier is None:
            hint = "--class needs --classifier (classifier guidance)" if model.classifier_guidance else "it takes no --class"
            raise UsageError(f"this run is unconditional: {hint}")
        if self.classifier is not None and self.labels is None:
            raise UsageError("classifier guidance needs --class")
        if not model.conditional and (guided or self.labels is not None or self.prompt or self.classifier is not None):
            raise UsageError(f"conditioning and guidance need a Gaussian run, this one is {model.method}")

    def label_tensor(self) -> torch.Tensor | None:
        """The class of each sample, long [n], or None (no labels given or filled)."""
        return None if self.labels is None else self.labels.expand(self.n).clone()

    def part(self, lo: int, count: int) -> SampleRequest:
        """Samples ``start + lo .. start + lo + count - 1`` of this request (its rows of labels and noise)."""
        rows = {k: getattr(self, k)[lo:lo + count] for k in ("labels", "init_noise")
                if getattr(self, k) is not None and getattr(self, k).numel() > 1}
        return dataclasses.replace(self, n=count, start=self.start + lo, **rows)

    def options(self) -> dict:
        """The sampler options that were given (eta, order, variance, spacing, churn)."""
        return {k: getattr(self, k) for k in SAMPLER_OPTIONS if getattr(self, k) is not None}

    def sample_kwargs(self) -> dict:
        """The keyword arguments of :func:`difflab.runs.draw.sample_images` (and ``Run.sample``,
        ``stream_samples``) for this request; settings still None are left out (the run's own apply)."""
        kw = {"seed": self.seed, "start": self.start, "sampler": self.sampler, "steps": self.steps,
              "guidance": self.guidance, "autoguidance": self.autoguidance, "guide_sigmas": self.guide_sigmas,
              "clip": self.clip, **{k: getattr(self, k) for k in GUIDANCE_RULE},
              "labels": self.label_tensor(), "prompt": self.prompt,
              "init_noise": self.init_noise, "batch_size": self.batch_size, **self.options()}
        if self.cold_update is not None:
            kw["cold_update"] = bool(self.cold_update)  # naive2's cold-diffusion update
        if self.told_noise is not None:
            kw["told_noise"] = self.told_noise  # naive2: the noise level the network is told
        if self.classifier is not None:
            kw.update(classifier=self.classifier, classifier_scale=self.classifier_scale,
                      classifier_sigma_max=self.classifier_sigma_max)
        return {k: v for k, v in kw.items() if v is not None}

    def evaluations(self, levels: Sequence[float] | None = None) -> int:
        """Network evaluations per sample (classifier-free guidance batches both passes into one, and outside
        ``guide_sigmas`` makes the conditional pass alone: one evaluation either way; autoguidance
        calls the guide network as well, at the sampler's noise ``levels`` inside ``guide_sigmas``; without
        the levels, at every step)."""
        from difflab.guidance import guided
        from difflab.samplers import evaluates_on_grid, evaluations

        calls = evaluations(self.sampler, self.steps, **self.options()) if self.sampler else (self.steps or 0)
        if self.autoguidance in (None, 1.0):
            return calls
        if levels is None or self.guide_sigmas is None or (self.sampler is not None and not evaluates_on_grid(self.sampler)):
            return calls * 2
        return calls + sum(bool(guided(float(s), self.guide_sigmas)) for s in levels if s > 0)


def cycled_labels(start: int, n: int, classes: int) -> torch.Tensor:
    """The classes of samples ``start .. start + n - 1`` when none are asked for: sample j draws class
    j mod ``classes`` (long [n])."""
    return torch.arange(start, start + n) % classes


def _pair(sigmas) -> tuple[float, float]:
    """--guide-sigmas: two noise levels 0 <= LO <= HI (HI may be inf: no upper limit)."""
    try:
        lo, hi = (float(v) for v in sigmas)
    except (TypeError, ValueError):
        raise UsageError(f"--guide-sigmas takes two noise levels LO HI, got {sigmas!r}") from None
    if not 0 <= lo <= hi:  # (False for NaN too)
        raise UsageError(f"--guide-sigmas must be 0 <= LO <= HI (HI may be inf), got {lo:g} {hi:g}")
    return lo, hi


def _labels(labels, n: int) -> torch.Tensor:
    """One class index (as a 1-element tensor) or n of them, long (their range is the model's: resolve)."""
    if isinstance(labels, (bool, str)) or not isinstance(labels, (int, np.integer, Sequence, torch.Tensor, np.ndarray)):
        raise UsageError(f"--class must be a class index or one per sample, got {labels!r}")
    try:
        t = torch.as_tensor(labels)
    except (TypeError, ValueError, RuntimeError) as e:
        raise UsageError(f"--class must be a class index or one per sample, got {labels!r}") from e
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool or t.ndim > 1 or t.numel() not in (1, n):
        raise UsageError(f"--class must be a class index or {n} of them (one per sample), got "
                         f"{t.dtype} {list(t.shape)}")
    return t.long().reshape(-1)


def _noise(noise, n: int) -> torch.Tensor:
    """Starting noise: float [>= n, C, H, W], finite; its first n rows as float32."""
    arr = noise.detach().cpu().numpy() if isinstance(noise, torch.Tensor) else np.asarray(noise)
    if arr.ndim != 4 or arr.shape[0] < n:
        raise UsageError(f"--init-noise must be float32 [N, C, H, W] with N >= --n ({n}); got shape {list(arr.shape)}")
    check_array("--init-noise", arr[:n], kinds="f", ndim=4)
    return torch.from_numpy(np.ascontiguousarray(arr[:n], dtype=np.float32))


def read_noise(path: str | Path, n: int) -> torch.Tensor:
    """Starting noise for n samples from a .npy file (never a pickle): float32 [n, C, H, W]."""
    p = Path(path)
    if not p.exists():
        raise UsageError(f"--init-noise file {path} does not exist")
    try:
        arr = np.load(p, allow_pickle=False)
    except ValueError as e:
        raise UsageError(f"--init-noise {path} is not a plain .npy array ({e})") from e
    except (OSError, EOFError) as e:
        raise UsageError(f"--init-noise {path} cannot be read ({e.__class__.__name__})") from e
    if not isinstance(arr, np.ndarray):
        raise UsageError(f"--init-noise {path} is not a plain .npy array")
    try:
        return _noise(arr, n)
    except UsageError as e:
        raise UsageError(str(e).replace("--init-noise", f"--init-noise {path}", 1)) from None
