"""A run loaded for drawing (:class:`Run`) and the one drawing path (:func:`drawing`) that ``difflab sample``,
:class:`difflab.Model`, the explorer, the trainer's grids and the figures all go through.

>>> from difflab.runs.draw import load_run
>>> run = load_run("runs/demo")
>>> images = run.sample(16, seed=0, sampler="ddim", steps=50)   # uint8 [16, C, H, W]
"""

from __future__ import annotations

import functools
import math
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from difflab import nets, runtime
from difflab.conditioning import Conditioner
from difflab.config import TrainConfig, load_run_config
from difflab.denoiser import ClipX0
from difflab.errors import CheckpointError, UsageError
from difflab.figures import to_uint8
from difflab.runs.request import ModelTraits, SampleRequest, cycled_labels
from difflab.runs.data import RESUME_OVERRIDES, data_name, load_data, make_conditioner, prompt_cache
from difflab.runs.checkpoint import latest_checkpoint, load_checkpoint
from difflab.methods.method import Method, make_method


@torch.no_grad()
def sample_images(method: Method, net, conditioner: Conditioner | None, n: int, shape, *, seed: int = 0,
                  steps: int = 50, sampler: str | None = None, device="cpu", batch_size: int = 256,
                  labels: torch.Tensor | None = None, prompt: str | None = None, guidance: float = 1.0,
                  start: int = 0, init_noise: torch.Tensor | None = None, classifier=None,
                  classifier_scale: float = 0.0, classifier_sigma_max: float | None = None, progress=None,
                  callback=None, clip: str = "clip", data_range: tuple[float, float] = (-1.0, 1.0),
                  autoguidance: float = 1.0, guide=None, guide_sigmas: tuple[float, float] | None = None,
                  guidance_rescale: float = 0.0, apg_eta: float | None = None, apg_threshold: float | None = None,
                  apg_momentum: float | None = None, guide_keep_mean: bool | None = None, **options) -> torch.Tensor:
    """n samples as uint8 [n, C, H, W]. Sample j depends only on (seed, start + j). The settings are
    those of a :class:`~difflab.runs.request.SampleRequest`, which checks them (:func:`sample_request`).

    Conditional runs: ``labels`` (class indices) or ``prompt``; with neither, the classes in turn
    (:func:`~difflab.runs.request.cycled_labels`; text runs: each class's first caption). ``guidance`` is the
    classifier-free scale g (g = 1: no guidance). ``classifier`` + ``classifier_scale`` steer with
    a noisy classifier's gradient (classifier guidance; needs ``labels``), at noise levels up to
    ``classifier_sigma_max`` (default ``guidance.CLASSIFIER_SIGMA_MAX``; ``math.inf``: every level).
    ``autoguidance`` w != 1 mixes in ``guide``, a weaker network of the same run (:meth:`Run.guide_net`):
    D_guide + w (D - D_guide), each under the same classifier-free guidance. Both guide only at the noise
    levels in ``guide_sigmas`` (lo, hi) (every level when None); elsewhere the network is called once, unguided.
    ``guidance_rescale`` phi, APG (``apg_eta``, ``apg_threshold``, ``apg_momentum``) and ``guide_keep_mean``
    change how both make the guided estimate (:class:`~difflab.guidance.GuidanceRule`).
    ``clip`` limits every x0 estimate to ``data_range`` after guidance (:class:`~difflab.denoiser.ClipX0`:
    ``clip``, ``dynamic`` or ``none``)."""
    net.eval()
    wrap, cond_fn = guidance_wrap(method, conditioner, n, device=device, batch_size=batch_size, labels=labels,
                                  prompt=prompt, start=start, guidance=guidance, classifier=classifier,
                                  classifier_scale=classifier_scale, classifier_sigma_max=classifier_sigma_max,
                                  clip=clip, data_range=data_range, autoguidance=autoguidance, guide=guide,
                                  guide_sigmas=guide_sigmas, guidance_rescale=guidance_rescale, apg_eta=apg_eta,
                                  apg_threshold=apg_threshold, apg_momentum=apg_momentum,
                                  guide_keep_mean=guide_keep_mean)
    x = method.sample(net, n, shape, seed=seed, sampler=sampler, steps=steps, batch_size=batch_size, device=device,
                      start=start, callback=callback, wrap=wrap, cond_fn=cond_fn, init_noise=init_noise,
                      progress=progress, **options)
    return to_uint8(x)


def guidance_wrap(method: Method, conditioner: Conditioner | None, n: int, *, device="cpu", batch_size: int = 256,
                  labels: torch.Tensor | None = None, prompt: str | None = None, start: int = 0, guidance: float = 1.0,
                  classifier=None, classifier_scale: float = 0.0, classifier_sigma_max: float | None = None,
                  clip: str = "clip", data_range: tuple[float, float] = (-1.0, 1.0), autoguidance: float = 1.0,
                  guide=None, guide_sigmas: tuple[float, float] | None = None, guidance_rescale: float = 0.0,
                  apg_eta: float | None = None, apg_threshold: float | None = None, apg_momentum: float | None = None,
                  guide_keep_mean: bool | None = None):
    """(wrap, cond_fn) of n images drawn with these settings (those of :func:`sample_images`): ``wrap(denoiser)``
    puts the guidance and x0 clipping around the method's denoiser, ``cond_fn(slice)`` gives a batch's
    condition (None for an unconditional draw). What sampling and editing (:mod:`difflab.editing`) share."""
    conditional = conditioner is not None and conditioner.kind != "none"
    if conditional and labels is None and prompt is None:
        labels = cycled_labels(start, n, conditioner.num_classes)
    if labels is not None:
        labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1).expand(n)
    cond_fn = _cond_fn(conditioner, labels, prompt, device) if conditional else None
    from difflab.guidance import APG, EVERYWHERE

    wraps = []  # around the method's denoiser, innermost first
    threshold = math.inf if apg_threshold is None else apg_threshold
    plain = apg_eta is None or (apg_eta == 1 and threshold == math.inf and not apg_momentum)  # APG's identity
    apg = None if plain else APG(apg_eta, threshold, apg_momentum or 0.0)
    rule = {"sigmas": guide_sigmas if guide_sigmas is not None else EVERYWHERE, "rescale": guidance_rescale, "apg": apg,
            "keep_mean": bool(guide_keep_mean)}
    if conditional and guidance != 1.0:
        from difflab.guidance import ClassifierFreeGuidance

        null = conditioner.null(min(n, batch_size), device)
        wraps.append(lambda d: ClassifierFreeGuidance(d, null, guidance, **rule))
    if autoguidance != 1.0:
        from difflab.guidance import Autoguidance

        if guide is None:
            raise UsageError("autoguidance needs the guide network (Run.guide_net)")
        under = list(wraps)  # the guide gets the same classifier-free guidance as the network
        wraps.append(lambda d: Autoguidance(d, _wrapped(method.denoiser(guide), under), autoguidance, **rule))
    if classifier is not None:
        from difflab.guidance import CLASSIFIER_SIGMA_MAX, ClassifierGuidance

        sigma_max = CLASSIFIER_SIGMA_MAX if classifier_sigma_max is None else classifier_sigma_max
        wraps.append(lambda d: ClassifierGuidance(d, classifier, classifier_scale, sigma_max))
        cond_fn = _with_classifier_labels(cond_fn, labels, device)
    if clip != "none":
        wraps.append(lambda d: ClipX0(d, clip, data_range))
    return (lambda den: _wrapped(den, wraps)), cond_fn


def _wrapped(den, wraps: list):
    for w in wraps:  # innermost first
        den = w(den)
    return den


def _cond_fn(conditioner: Conditioner, labels: torch.Tensor | None, prompt: str | None, device):
    """cond_fn(slice) of a conditional run: the prompt for every sample, or each sample's class."""
    def cond_fn(sl: slice):
        if prompt is not None:
            return conditioner.text([prompt] * (sl.stop - sl.start), device)
        return conditioner.for_labels(labels[sl], device)

    return cond_fn


def _with_classifier_labels(base_fn, labels: torch.Tensor, device):
    """``base_fn``'s condition with the classifier's target classes riding along (classifier guidance)."""
    def cond_fn(sl: slice):
        c = dict(base_fn(sl) or {}) if base_fn is not None else {}
        c["classifier_labels"] = labels[sl].to(device)
        return c

    return cond_fn


@dataclass(frozen=True)
class Drawing:
    """A request resolved once against the model that draws it (:func:`drawing`): its defaults, classes,
    classifier and precision filled in, and the grid it steps through fixed (a diffusers folder's scheduler
    ``plan``, handed to every draw, never left on the model). Every route that draws samples goes through one:
    ``difflab sample``, ``Model.sample``, the explorer's panels, the trainer's grids and ``difflab figures``."""

    model: Any  # a Run, or a diffusers folder's FolderModel
    request: SampleRequest
    plan: Any = None  # a SchedulerPlan for a diffusers folder on its scheduler's grid

    def images(self, *, progress=None, callback=None, net=None) -> torch.Tensor:
        """All the samples as uint8 [n, C, H, W]. ``progress(k)``: k more images' worth of steps;
        ``callback(dict)`` after every sampler step; ``net``: a wrapper of the model's network to call
        instead (one that watches or records its inputs)."""
        return self.part(0, self.request.n, progress=progress, callback=callback, net=net)

    def part(self, lo: int, count: int, *, progress=None, callback=None, net=None) -> torch.Tensor:
        """Samples ``lo .. lo + count - 1`` of the request (the same images as in :meth:`images`)."""
        req = self.request if (lo, count) == (0, self.request.n) else self.request.part(lo, count)
        return self.model.draw(req, plan=self.plan, progress=progress, callback=callback, net=net)

    def sharded(self, ctx, *, progress=None, callback=None) -> torch.Tensor:
        """:meth:`images` with the n samples split over the ranks of ``ctx`` (a
        :class:`~difflab.runs.distributed.DistContext`; every rank gets all n, on the CPU). Methods that
        seed per batch are split on batch ends, so the images do not depend on the number of ranks.
        ``callback`` follows the first part only (the part holding sample 0)."""
        from difflab.runs.distributed import sample_sharded

        def draw(lo: int, count: int) -> torch.Tensor:
            return self.part(lo, count, progress=progress, callback=callback if lo == 0 else None)

        return sample_sharded(draw, self.request.n, ctx, shard_block(self.model, self.request))

    def evaluations(self) -> int:
        """Network evaluations per sample (the guide's calls counted at the levels of a run's grid)."""
        return _evaluations(self.model, self.request)


def drawing(model, request: SampleRequest) -> Drawing:
    """``request`` resolved once for ``model`` (a :class:`Run`, or a diffusers folder's
    :class:`~difflab.interop.folder_model.FolderModel`): checked, completed with the model's defaults and
    prepared (``model.prepare``), with the grid it will be drawn on (``model.plan``)."""
    req = model.prepare(request)
    return Drawing(model, req, model.plan(req))


def sample_request(model, request: SampleRequest, *, progress=None, callback=None) -> torch.Tensor:
    """The samples of ``request`` from ``model`` as uint8 [n, C, H, W] (:func:`drawing`, then all its images)."""
    return drawing(model, request).images(progress=progress, callback=callback)


def request_evaluations(model, request: SampleRequest) -> int:
    """Network evaluations per sample that ``request`` makes on ``model`` (a :class:`Run` or a folder model),
    its defaults filled in: the guide's calls counted at the levels of the run's grid."""
    return _evaluations(model, request.resolve(model.traits()))


def _evaluations(model, req: SampleRequest) -> int:
    return req.evaluations(model.levels(req) if isinstance(model, Run) else None)


def shard_block(model, request: SampleRequest) -> int:
    """What the ranks' shares of a request are multiples of: one sample, or a batch for the methods
    whose randomness is per batch."""
    return 1 if model.per_sample_seeds else request.batch_size


@dataclass
class Run:
    """A trained run: its config, method, EMA network and conditioning, ready to sample."""

    path: Path
    cfg: TrainConfig
    method: Method
    net: torch.nn.Module
    conditioner: Conditioner
    shape: tuple[int, int, int]
    class_names: list[str] | None
    step: int
    device: torch.device
    network: dict = field(default_factory=dict, repr=False)  # the network's config (nets.build)
    _guide: torch.nn.Module | None = field(default=None, repr=False)

    def sample(self, n: int, *, progress=None, callback=None, **request) -> torch.Tensor:
        """n samples as uint8 [n, C, H, W] of a :class:`~difflab.runs.request.SampleRequest` with the settings
        ``request`` (seed, start, sampler, steps, guidance, labels, prompt, ...); the run's own sampler, step
        count, x0 clipping and (conditional runs) guidance scale unless given."""
        return sample_request(self, SampleRequest.of(run=self.path, n=n, **request), progress=progress,
                              callback=callback)

    @property
    def per_sample_seeds(self) -> bool:
        return self.method.per_sample_seeds

    def traits(self) -> ModelTraits:
        """What a request is checked against: the method, the conditioning and its classes."""
        return ModelTraits(self.method.name, self.method.conditional, self.conditioner.kind,
                           self.conditioner.num_classes, tuple(self.shape), self.sampling_defaults(),
                           autoguidable=self.autoguidable)

    @functools.cached_property
    def autoguidable(self) -> bool:
        """Whether the run has a weaker version of itself to guide with: an EMA snapshot from the first half of
        its loaded step (fixed for a loaded run, so looked up once)."""
        from difflab.runs.posthoc_ema import guide_snapshot

        return self.method.conditional and self.cfg is not None and guide_snapshot(self.path, self.cfg.guide_at, self.step) is not None

    def guide_net(self, autoguidance: float | None) -> torch.nn.Module | None:
        """The autoguidance guide when ``autoguidance`` is on (not None or 1): the run's EMA snapshot nearest
        ``guide_at`` of the loaded step (its tracked length nearest the main EMA's), loaded once, in the
        network's dtype; None when off."""
        if autoguidance is None or autoguidance == 1.0:
            return None
        if self._guide is None:
            from difflab.runs.posthoc_ema import load_guide

            weights, _ = load_guide(self.path, self.cfg.guide_at, self.cfg.ema_length or 0.05, self.device, self.step)
            guide = nets.build(self.network).to(self.device)
            guide.load_state_dict(weights)
            dtype = next(self.net.parameters()).dtype
            self._guide = guide.eval().requires_grad_(False).to(dtype=dtype, memory_format=torch.channels_last)
        return self._guide

    def prepare(self, request: SampleRequest) -> SampleRequest:
        """``request`` checked against this run, with its defaults, its classifier loaded and its
        precision applied (bf16: the weights are converted in place)."""
        req = request.resolve(self.traits())
        if isinstance(req.classifier, (str, Path)):
            from difflab.runs.classifier import load_classifier

            req = replace(req, classifier=load_classifier(req.classifier, self.device))
        if req.precision == "bf16":
            self.speed_up(bf16=True)
        return req

    def plan(self, request: SampleRequest) -> None:
        """A run draws on difflab's own grid, which the request's settings fix (no scheduler plan)."""
        return None

    def draw(self, request: SampleRequest, *, plan=None, progress=None, callback=None, net=None) -> torch.Tensor:
        """The samples of a prepared request (:func:`drawing`); ``net`` a wrapper of the run's network."""
        images = sample_images(self.method, net if net is not None else self.net, self.conditioner, request.n,
                               self.shape, device=self.device, progress=progress, callback=callback,
                               guide=self.guide_net(request.autoguidance), **request.sample_kwargs())
        if progress is not None and not self.per_sample_seeds:
            progress(request.n)  # batch-seeded methods draw a batch at a time, with no progress of their own
        return images

    def editing(self, request: SampleRequest):
        """What :meth:`Model.edit <difflab.model.Model.edit>` draws with for a prepared request: (the denoiser with
        the request's guidance and clipping, cond_fn(slice) of its images, the sampler's grid, the sampler's options)."""
        from difflab.samplers import sampler_sigmas

        kw = request.sample_kwargs()
        options = request.options()
        spacing, sigma_min = options.pop("spacing", None), options.pop("sigma_min", None)
        own = {"seed", "start", "sampler", "steps", "init_noise", "batch_size", *request.options()}
        wrap, cond_fn = guidance_wrap(self.method, self.conditioner, request.n, device=self.device,
                                      batch_size=request.batch_size, guide=self.guide_net(request.autoguidance),
                                      **{k: v for k, v in kw.items() if k not in own})
        den = wrap(self.denoiser())
        return den, cond_fn, sampler_sigmas(den.process, request.sampler, request.steps, spacing, sigma_min), options

    def sampling_defaults(self) -> dict:
        """What the run samples with unless told: its sampler, step count, x0 clipping and, for class and
        text runs, its guidance scale (saved in config.json); none for a model trained elsewhere."""
        if self.cfg is None:
            return {}
        bottom = self.grid_bottom() if self.method.denoises else None
        d = self.method.sampling_defaults(grid_bottom=bottom)
        if bottom is not None:
            d["sigma_min"] = bottom
        if self.conditioner.kind != "none":
            d["guidance"] = self.cfg.guidance
        elif self.cfg.autoguidance != 1.0 and self.autoguidable:
            d["autoguidance"] = self.cfg.autoguidance
        return d

    def grid_bottom(self) -> float:
        """The bottom of the karras and geometric grids unless told: ``--sample-sigma-min``, or for ``auto`` the level
        measured when training ended (:mod:`difflab.runs.grid_bottom`)."""
        from difflab.runs.grid_bottom import run_bottom

        return run_bottom(self.path, self.cfg.sample_sigma_min)

    def measure_grid_bottom(self) -> dict | None:
        """Measure the run's grid bottom now (:func:`difflab.runs.grid_bottom.measure_training`) from its loaded EMA
        weights and its training data, and save it; for runs trained before the measurement existed."""
        from difflab.runs.grid_bottom import measure_training
        from difflab.runs.data import load_fitted

        data = load_fitted(self.cfg.data, "train", tuple(self.shape))
        return measure_training(self.path, self.method, self.net, data, self.conditioner, self.step, self.device)

    def levels(self, request: SampleRequest) -> list[float]:
        """The noise levels a resolved request's sampler steps through (its grid, without the final 0)."""
        from difflab.samplers import sampler_sigmas

        if request.sampler not in self.method.samplers or request.steps is None:
            return []
        grid = sampler_sigmas(self.denoiser().process, request.sampler, request.steps, request.spacing, request.sigma_min)
        return [float(s) for s in grid[:-1]]

    def denoiser(self, net: torch.nn.Module | None = None):
        """The run's denoiser D(x, sigma) (its EMA network, or ``net``, a wrapper of it), or None for a method
        without one (part 1)."""
        return self.method.denoiser(self.net if net is None else net)

    def ode_denoiser(self, net: torch.nn.Module | None = None):
        """D(x, sigma) for deterministic DDIM work (inversion, interpolation): :meth:`denoiser`."""
        return self.denoiser(net)

    def speed_up(self, bf16: bool = False, compile: bool = False) -> Run:
        """Make sampling faster, in place: pure bf16 weights (GPUs, and CPUs with AMX) and/or
        ``torch.compile`` (see :func:`compile_for_sampling`). Returns ``self``."""
        if bf16:
            self.net = self.net.to(torch.bfloat16)
            self._guide = None if self._guide is None else self._guide.to(torch.bfloat16)
        if compile:
            self.net = compile_for_sampling(self.net, self.device)
        return self


def compile_for_sampling(net: torch.nn.Module, device: torch.device | str) -> torch.nn.Module:
    """``net`` compiled for inference on ``device``: on GPUs with CUDA graphs (``mode="reduce-overhead"``),
    on CPUs with inductor's weight freezing and C++ wrapper (:class:`CpuCompiled`)."""
    from difflab.nets import cpu_kernels

    cpu_kernels.prepare_compile()
    if torch.device(device).type == "cuda":
        return torch.compile(net, mode="reduce-overhead")
    return CpuCompiled(net)


def _signature(args: tuple, kwargs: dict) -> tuple:
    """What makes torch.compile (``dynamic=False``) compile again: tensor shapes, strides and dtypes,
    other values as they are."""
    def one(a):
        if isinstance(a, torch.Tensor):
            return (tuple(a.shape), a.stride(), a.dtype, a.device)
        if isinstance(a, (list, tuple)):
            return tuple(map(one, a))
        if isinstance(a, dict):
            return tuple((k, one(v)) for k, v in sorted(a.items()))
        return a if isinstance(a, (int, float, bool, str, type(None))) else type(a)

    return tuple(map(one, args)) + tuple((k, one(v)) for k, v in sorted(kwargs.items()))


class CpuCompiled(torch.nn.Module):
    """``torch.compile(net)`` for CPU inference, with two inductor settings for this network only:
    weight freezing (constant weights, pre-packed for oneDNN convolutions: 1.4x) and the C++ wrapper
    (the compiled graph runs as one C++ call instead of Python code calling each kernel, so the threads
    ``generate`` splits a batch over do not queue for the GIL: 1.25x with two threads, mnist-small).

    The settings are read whenever a graph is compiled, recompilations for new shapes included, and
    they are context variables (each thread has its own), so every call sets them for its own duration.
    A call with inputs not seen before compiles, and runs alone: the threads of a split batch would
    otherwise each compile the same graph (first DDIM-10 call, mnist-small: 24 s instead of 13 to 15 s)."""

    SETTINGS = {"freezing": True, "cpp_wrapper": True}

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.compiled = torch.compile(net, dynamic=False)
        self._seen: set = set()
        self._compiling = threading.Lock()

    def forward(self, *args, **kwargs):
        import torch._inductor.config as inductor_config

        with inductor_config.patch(self.SETTINGS):
            sig = _signature(args, kwargs)
            if sig in self._seen:
                return self.compiled(*args, **kwargs)
            with self._compiling:
                out = self.compiled(*args, **kwargs)
                self._seen.add(sig)
                return out


def load_run(path: str | Path, device: str | torch.device = "cpu", checkpoint: str | Path | None = None,
             ema: bool = True, ema_length: float | None = None) -> Run:
    """Load a run folder written by ``difflab train`` (the latest verified checkpoint, EMA weights).
    ``ema_length``: the post-hoc power EMA of that relative length instead (``difflab ema`` saved it,
    or it is built now from the run's EMA snapshots; see :mod:`difflab.runs.posthoc_ema`)."""
    path = Path(path)
    if ema_length is not None and not ema:
        raise UsageError("ema=False (the raw weights) and an ema_length exclude each other")
    cfg = load_run_config(path)
    device = torch.device(device)
    if device.type == "cpu":
        runtime.tune_cpu()  # denormals of near-zero layers are several times slower on x86; malloc reuse
    found = load_checkpoint(checkpoint, device) if checkpoint else latest_checkpoint(path / "checkpoints", device)
    if found is None:
        raise CheckpointError(f"'{path}' has no checkpoint yet: train it first (difflab train --out {path})")
    tensors, meta = found
    _check_config_matches(path, cfg, meta)
    try:
        net = nets.build(meta["network"]).to(device)
        weights, step = nets.split_prefix(tensors, "ema" if ema else "model"), int(meta["step"])
        if ema_length is not None:
            from difflab.runs.posthoc_ema import load_posthoc_ema

            weights, info = load_posthoc_ema(path, ema_length, device)
            step = int(info["step"])
        net.load_state_dict(weights)
    except (RuntimeError, TypeError, ValueError, KeyError) as e:
        raise CheckpointError(f"checkpoint in {path} does not match its network config "
                              f"({str(e).splitlines()[0]})") from e
    net.eval().requires_grad_(False).to(memory_format=torch.channels_last)
    method = make_method(cfg)
    class_names = meta.get("class_names")
    conditioner = make_conditioner(cfg, len(class_names) if class_names else 0, class_names, data_name(cfg),
                                   lambda: prompt_cache(path, device, need_encoder=False))
    if method.samples_from_data:
        method.prepare(load_data(cfg))
    return Run(path, cfg, method, net, conditioner, tuple(meta["image_shape"]), class_names, step, device,
               network=meta["network"])


def _check_config_matches(path: Path, cfg: TrainConfig, meta: dict) -> None:
    """The checkpoint's own config decides what its weights mean: an edited config.json that disagrees
    with it (in anything but the settings a resumed run may change) is an error, not a silent mix."""
    if "network" not in meta or "image_shape" not in meta:
        raise CheckpointError(f"the checkpoint in {path} has no network config; it was not written by difflab train")
    saved = meta.get("config")
    if not isinstance(saved, dict):  # config.json alone would then decide the process, the method...
        raise CheckpointError(f"the checkpoint in {path} has no config; it was edited or not written by difflab train")
    diff = sorted(k for k, v in cfg.to_json().items() if k not in RESUME_OVERRIDES and k in saved and saved[k] != v)
    if diff:
        k = diff[0]
        raise CheckpointError(f"{path}/config.json says {k} = {getattr(cfg, k)!r} but its checkpoint was trained "
                              f"with {saved[k]!r}; restore config.json (the checkpoint's config is the truth)")
