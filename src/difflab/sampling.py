"""Sampling from trained runs: the Python API behind ``difflab sample``.

>>> from difflab.sampling import load_run
>>> run = load_run("runs/demo")
>>> images = run.sample(16, seed=0, sampler="ddim", steps=50)   # uint8 [16, C, H, W]
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from difflab import nets, runtime
from difflab.conditioning import Conditioner
from difflab.config import TrainConfig, load_run_config
from difflab.denoiser import ClipX0
from difflab.errors import CheckpointError, UsageError
from difflab.figures import to_uint8
from difflab.runs import RESUME_OVERRIDES, data_name, load_data, make_conditioner, prompt_cache
from difflab.train.checkpoint import latest_checkpoint, load_checkpoint, split_prefix
from difflab.train.methods import Method, make_method


@torch.no_grad()
def sample_images(method: Method, net, conditioner: Conditioner | None, n: int, shape, *, seed: int = 0,
                  steps: int = 50, sampler: str | None = None, device="cpu", batch_size: int = 256,
                  labels: torch.Tensor | None = None, prompt: str | None = None, guidance: float = 1.0,
                  start: int = 0, init_noise: torch.Tensor | None = None, classifier=None,
                  classifier_scale: float = 0.0, classifier_sigma_max: float | None = None, progress=None,
                  callback=None, clip: str = "clip", data_range: tuple[float, float] = (-1.0, 1.0),
                  **options) -> torch.Tensor:
    """n samples as uint8 [n, C, H, W]. Sample j depends only on (seed, start + j).

    Conditional runs: ``labels`` (class indices) or ``prompt``; with neither, class runs cycle
    through the classes and text runs use each class's first caption. ``guidance`` is the
    classifier-free scale g (g = 1: no guidance). ``classifier`` + ``classifier_scale`` steer with
    a noisy classifier's gradient (classifier guidance; needs ``labels``), at noise levels up to
    ``classifier_sigma_max`` (default ``guidance.CLASSIFIER_SIGMA_MAX``; ``math.inf``: every level).
    ``clip`` limits every x0 estimate to ``data_range`` after guidance (:class:`~difflab.denoiser.ClipX0`:
    ``clip``, ``dynamic`` or ``none``)."""
    net.eval()
    if not method.conditional and (guidance != 1.0 or labels is not None or prompt or classifier is not None):
        raise UsageError(f"conditioning and guidance need a Gaussian run, this one is {method.name}")
    wraps = []  # around the method's denoiser, innermost first
    cond_fn = None
    if conditioner is not None and conditioner.kind != "none":
        if labels is None and prompt is None:
            labels = torch.arange(start, start + n) % conditioner.num_classes
        if labels is not None:
            labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1).expand(n) if torch.as_tensor(
                labels).numel() == 1 else torch.as_tensor(labels, dtype=torch.long)
            if bool((labels < 0).any() or (labels >= conditioner.num_classes).any()):
                raise UsageError(f"--class must be in 0..{conditioner.num_classes - 1}")

        def cond_fn(sl: slice):
            m = sl.stop - sl.start
            if prompt is not None:
                if conditioner.kind != "text":
                    raise UsageError("--prompt needs a run trained with --conditioning text")
                return conditioner.text([prompt] * m, device)
            return conditioner.for_labels(labels[sl], device)

        if guidance != 1.0:
            from difflab.guidance import ClassifierFreeGuidance

            null = conditioner.null(min(n, batch_size), device)
            wraps.append(lambda d: ClassifierFreeGuidance(d, null, guidance))
    elif guidance != 1.0 or labels is not None or prompt is not None:
        if classifier is None:
            raise UsageError("this run is unconditional: --class/--prompt/--guidance need a run trained with "
                             "--conditioning class|text (or pass --classifier for classifier guidance)")
    if classifier is not None:
        from difflab.guidance import CLASSIFIER_SIGMA_MAX, ClassifierGuidance

        if labels is None:
            raise UsageError("classifier guidance needs --class")
        labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1).expand(n).clone() if torch.as_tensor(
            labels).numel() == 1 else torch.as_tensor(labels, dtype=torch.long)
        sigma_max = CLASSIFIER_SIGMA_MAX if classifier_sigma_max is None else classifier_sigma_max
        wraps.append(lambda d: ClassifierGuidance(d, classifier, classifier_scale, sigma_max))
        base_fn = cond_fn

        def cond_fn(sl: slice):  # noqa: F811 - the classifier's target rides along with the condition
            c = dict(base_fn(sl) or {}) if base_fn is not None else {}
            c["classifier_labels"] = labels[sl].to(device)
            return c

    if clip != "none":
        wraps.append(lambda d: ClipX0(d, clip, data_range))

    def wrap(den):
        for w in wraps:
            den = w(den)
        return den

    x = method.sample(net, n, shape, seed=seed, sampler=sampler, steps=steps, batch_size=batch_size, device=device,
                      start=start, callback=callback, wrap=wrap, cond_fn=cond_fn, init_noise=init_noise,
                      progress=progress, **options)
    return to_uint8(x)


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

    def sample(self, n: int, **kwargs) -> torch.Tensor:
        """n samples as uint8 [n, C, H, W] (see :func:`sample_images`); the run's own sampler, step
        count, x0 clipping and (conditional runs) guidance scale unless given."""
        return sample_images(self.method, self.net, self.conditioner, n, self.shape,
                             **{"device": self.device, **self.sampling_defaults(), **kwargs})

    def sampling_defaults(self) -> dict:
        """What the run samples with unless told: its sampler, step count, x0 clipping and, for class and
        text runs, its guidance scale (saved in config.json); none for a model trained elsewhere."""
        if self.cfg is None:
            return {}
        d = {"sampler": self.cfg.sampler, "steps": self.cfg.sample_steps, "clip": self.cfg.clip}
        if self.conditioner.kind != "none":
            d["guidance"] = self.cfg.guidance
        return d

    def denoiser(self):
        return self.method.denoiser(self.net)

    def speed_up(self, bf16: bool = False, compile: bool = False) -> Run:
        """Make sampling faster, in place: pure bf16 weights (GPUs, and CPUs with AMX) and/or
        ``torch.compile`` (see :func:`compile_for_sampling`). Returns ``self``."""
        if bf16:
            self.net = self.net.to(torch.bfloat16)
        if compile:
            self.net = compile_for_sampling(self.net, self.device)
        return self


def compile_for_sampling(net: torch.nn.Module, device: torch.device | str) -> torch.nn.Module:
    """``net`` compiled for inference on ``device``: on GPUs with CUDA graphs (``mode="reduce-overhead"``),
    on CPUs with inductor's weight freezing and C++ wrapper (:class:`CpuCompiled`)."""
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
    or it is built now from the run's EMA snapshots; see :mod:`difflab.train.posthoc_ema`)."""
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
        weights, step = split_prefix(tensors, "ema" if ema else "model"), int(meta["step"])
        if ema_length is not None:
            from difflab.train.posthoc_ema import load_posthoc_ema

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
    return Run(path, cfg, method, net, conditioner, tuple(meta["image_shape"]), class_names, step, device)


def _check_config_matches(path: Path, cfg: TrainConfig, meta: dict) -> None:
    """The checkpoint's own config decides what its weights mean: an edited config.json that disagrees
    with it (in anything but the settings a resumed run may change) is an error, not a silent mix."""
    if "network" not in meta or "image_shape" not in meta:
        raise CheckpointError(f"the checkpoint in {path} has no network config; it was not written by difflab train")
    saved = meta.get("config")
    if not isinstance(saved, dict):
        return
    diff = sorted(k for k, v in cfg.to_json().items() if k not in RESUME_OVERRIDES and k in saved and saved[k] != v)
    if diff:
        k = diff[0]
        raise CheckpointError(f"{path}/config.json says {k} = {getattr(cfg, k)!r} but its checkpoint was trained "
                              f"with {saved[k]!r}; restore config.json (the checkpoint's config is the truth)")
