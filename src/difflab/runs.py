"""The run layer: what training and sampling a run both need, built one way for the trainer,
:func:`difflab.sampling.load_run`, the CLI and the web page.

- the device (:func:`pick_device`),
- the data with the one shape rule (:func:`load_data`, :func:`load_fitted`; :func:`padded_size`,
  :func:`pad_as_trained`, :func:`reference_data`),
- the conditioner (:func:`make_conditioner`, :func:`prompt_cache`),
- the one-line description of a run (:func:`describe_run`),
- which settings a resumed run may change (:data:`RESUME_OVERRIDES`).

It sits beneath ``training/`` and ``sampling.py`` (they import it, it imports neither).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from difflab.conditioning import Conditioner
from difflab.config import DEVICE, TrainConfig
from difflab.data import ImageData, load
from difflab.errors import DataError, UsageError
from difflab.nets import fit

# flags that may change when a run is resumed; anything else must match the saved run
RESUME_OVERRIDES = {"steps", "time_limit", "sample_every", "sample_steps", "sampler", "clip", "autoguidance", "guide_at",
                    "guide_sigma_min", "guide_sigma_max", "sample_sigma_min", "cold_update", "told_noise",
                    "checkpoint_every", "keep", "log_every", "logger", "device", "out", "compile", "precision",
                    "eval_every", "eval_metric", "eval_n"}

PADDED = 32  # the size MNIST-like 28x28 images are trained at: every UNet preset halves it three times


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """The torch device of ``--device`` (auto, cpu, mps, cuda or cuda:N); ``cuda`` is this process's GPU
    under torchrun (``local_rank``)."""
    if not DEVICE.fullmatch(name):
        raise UsageError(f"--device must be auto, cpu, cuda or cuda:N, got '{name}'")
    if name == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {name} asked for, but torch sees no CUDA GPU (install a CUDA build of torch)")
    dev = torch.device(name)
    return torch.device(f"cuda:{local_rank}") if dev.type == "cuda" and dev.index is None else dev


def padded_size(height: int, width: int, target: int | None = None) -> int | None:
    """The one shape rule: MNIST-like 28x28 images are padded to 32x32 when no other size is asked for
    (``target`` None) or when 32 is; None: no padding."""
    return PADDED if (height, width) == (28, 28) and target in (None, PADDED) else None


def pad_as_trained(data: ImageData, name: str, split: str, target: int | None = None, **kw: Any) -> ImageData:
    """``data`` (``split`` of dataset or folder ``name``, loaded with ``kw``) padded by :func:`padded_size`
    when the rule applies to it, else ``data`` itself."""
    pad = padded_size(data.height, data.width, target)
    return load(name, split=split, pad_to=pad, **kw) if pad else data


def load_as_trained(name: str, split: str = "train", image_size: int | None = None,
                    channels: int | None = None) -> ImageData:
    """The one data transform a run trains with, for ``split`` of dataset or folder ``name``: resized to
    ``image_size`` when given (folders: shorter side, then centre crop), else padded by :func:`padded_size`;
    ``channels`` (1 or 3) when given. Training (:func:`load_data`) and evaluation (:func:`reference_data`)
    both call it, so samples are compared with the images as the run saw them."""
    kw = {}
    if image_size:
        kw["image_size"] = image_size
    if channels:
        kw["channels"] = channels
    data = load(name, split=split, **kw)
    return data if image_size else pad_as_trained(data, name, split, **kw)


def load_data(cfg: TrainConfig, split: str = "train") -> ImageData:
    """The run's dataset as uint8 tensors, as it trains (:func:`load_as_trained`); square images only."""
    data = load_as_trained(cfg.data, split, cfg.image_size, cfg.image_channels)
    if data.height != data.width:
        raise UsageError(f"images must be square, got {data.height}x{data.width}; pass --image-size")
    return data


def reference_data(name: str, split: str, like: TrainConfig | tuple[int, ...], notes: list[str] | None = None) -> ImageData:
    """The reference images that samples are evaluated against: ``split`` of dataset or folder ``name``
    (train when it has no test split, said in ``notes``), transformed as run ``like`` (a TrainConfig)
    trained, or, without a run (a diffusers folder, a samples file), fitted to samples of (C, H, W)
    ``like`` (:func:`load_fitted`)."""
    def one(s: str) -> ImageData:
        if isinstance(like, TrainConfig):
            return load_as_trained(name, s, like.image_size, like.image_channels)
        return load_fitted(name, s, tuple(like[-3:]))

    try:
        return one(split)
    except DataError:
        if split != "test":
            raise
        if notes is not None:
            notes.append(f"{name} has no test split: the samples are compared with its training images")
        return one("train")


def load_fitted(name: str, split: str, shape: tuple[int, int, int]) -> ImageData:
    """The images of dataset or folder ``name`` fitted to a run's (C, H, W): as trained at their own
    size when that gives (H, W) (:func:`load_as_trained`), else resized to H."""
    from difflab.data import dataset_key

    c, h, w = shape
    if dataset_key(name) is not None and h == w:
        found = load_as_trained(name, split, None, c)
        if (found.height, found.width) == (h, w):
            return found
    return load_as_trained(name, split, h, c)


def prompt_cache(run_dir: str | Path, device: torch.device | str = "cpu", need_encoder: bool = True):
    """The text run's prompt cache (``RUN/prompts.safetensors``, or a new one), with the text encoder:
    needed to train; to sample, without it (not installed) only the cached prompts can be used."""
    from difflab.text import PromptCache, text_encoder

    try:
        encoder = text_encoder()
    except UsageError:  # not installed
        if need_encoder:
            raise
        encoder = None
    path = Path(run_dir) / "prompts.safetensors"
    return PromptCache.load(path, encoder, device=device) if path.exists() or not need_encoder else PromptCache(encoder)


def make_conditioner(cfg: TrainConfig, num_classes: int, class_names: list[str] | None, data_name: str,
                     prompts: Callable[[], Any] | None = None) -> Conditioner:
    """The run's condition: none, its class labels, or text prompts (the classes' captions; ``prompts()``
    makes the :class:`difflab.text.PromptCache`, called for text runs only)."""
    if cfg.conditioning != "text":
        return Conditioner(cfg.conditioning, num_classes, cfg.cond_drop)
    from difflab.data.captions import captions_for

    if class_names is None:
        raise UsageError("--conditioning text needs labelled data (class names become captions)")
    if prompts is None:
        raise UsageError("text conditioning needs a text encoder")
    return Conditioner("text", num_classes, cfg.cond_drop, captions_for(data_name, class_names), prompts())


def data_name(cfg: TrainConfig) -> str:
    """The dataset name the run's data goes by (a known dataset's key, else the folder as given)."""
    from difflab.data import dataset_key

    return dataset_key(cfg.data) or cfg.data


def _network_speed(cfg: TrainConfig, data: ImageData, net_config: dict, device: torch.device, world: int | None) -> str:
    """", G GFLOP per training image, about N images/s expected" (as far as they are known)."""
    gflop = fit.cost(net_config, (data.channels, data.height, data.width)).gflop
    if gflop is None:
        return ""
    ips = fit.expected_images_per_second(gflop, device, cfg.precision)
    speed = "" if ips is None else f", about {ips * (world or 1):,.{0 if ips >= 10 else 1}f} images/s expected"
    return f", {gflop:.2f} GFLOP per training image{speed}"


def describe_run(cfg: TrainConfig, data: ImageData, method_line: str, net_config: dict, n_params: int,
                 device: torch.device, world: int | None, step: int) -> str:
    """The one line a run starts with: method, data, network (parameters, GFLOP per image forward and
    backward, expected images/s), device (``world`` processes under torchrun, else None), batch and steps."""
    procs = f" x {world} processes" if world is not None else ""
    return (f"difflab: {cfg.method} on {data.name} ({len(data)} images {data.channels}x{data.height}x{data.width}) | "
            f"{net_config['kind']} {n_params / 1e6:.2f}M parameters{_network_speed(cfg, data, net_config, device, world)} | "
            f"{method_line} | "
            f"device {device}{procs} | batch {cfg.batch_size} | steps {step}->{cfg.steps}")
