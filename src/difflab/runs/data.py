"""A run's inputs: what training and sampling a run both need, built one way for the trainer,
:func:`difflab.runs.draw.load_run`, the CLI and the web page.

- the device (:func:`pick_device`),
- the data with the one shape rule (:func:`load_data`, :func:`load_fitted`; :func:`padded_size`,
  :func:`pad_as_trained`, :func:`reference_data`),
- the conditioner (:func:`make_conditioner`, :func:`prompt_cache`),
- the one-line description of a run (:func:`describe_run`),
- which settings a resumed run may change (:data:`RESUME_OVERRIDES`).

It sits beneath ``training/`` and ``runs.draw`` (they import it, it imports neither).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from difflab.conditioning import Conditioner
from difflab.config import DEVICE, TrainConfig
from difflab.data import ImageData, dataset_key, load, open_source, transforms
from difflab.data.source import ImageSource
from difflab.errors import DataError, UsageError
from difflab.nets import fit

# flags that may change when a run is resumed; anything else must match the saved run
RESUME_OVERRIDES = {"steps", "time_limit", "sample_every", "sample_steps", "sampler", "clip", "autoguidance", "guide_at",
                    "guide_sigma_min", "guide_sigma_max", "apg_eta", "guide_keep_mean", "sample_sigma_min", "cold_update",
                    "told_noise", "checkpoint_every", "keep", "log_every", "logger", "device", "out", "compile", "precision",
                    "eval_every", "eval_metric", "eval_n"}

PADDED = 32  # the size MNIST-like 28x28 images are trained at: every UNet preset halves it three times
PADDED_SETS = ("mnist", "fashion-mnist")  # the built-in 28x28 sets; a 28x28 folder keeps its own pixels
SIZE_MULTIPLE = 8  # a folder's images are resized up to a multiple of this when no size is asked for (28 -> 32)


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


def padded_size(height: int, width: int, target: int | None = None, *, name: str) -> int | None:
    """The one shape rule: the built-in MNIST-shaped sets (``PADDED_SETS``; ``name`` is the data set or
    folder) are padded from 28x28 to 32x32 with black when no other size is asked for (``target`` None) or
    when 32 is; None: no padding (always for folders)."""
    builtin = dataset_key(name) in PADDED_SETS
    return PADDED if builtin and (height, width) == (28, 28) and target in (None, PADDED) else None


def pad_as_trained(data: ImageData, name: str, target: int | None = None) -> ImageData:
    """``data`` (of dataset or folder ``name``) padded by :func:`padded_size` when the rule applies to it (the
    images in memory, not read again), else ``data`` itself."""
    pad = padded_size(data.height, data.width, target, name=name)
    if pad is None:
        return data
    return ImageData(transforms.pad(data.images, pad), data.labels, data.class_names, data.name, captions=data.captions)


def open_data(cfg: TrainConfig, split: str = "train", stream: bool = True, crops: bool = True,
              name: str | None = None, labels: bool = False) -> ImageSource:
    """The run's dataset (or dataset ``name``, transformed as this run's) as it trains: ``--image-size`` when
    given, else padded by :func:`padded_size` (the built-in 28x28 sets) or resized up to a multiple of
    ``SIZE_MULTIPLE`` (folders); square images only. The one transform of training and evaluation.
    ``stream``: large sets are read batch by batch (see :func:`difflab.data.open_source`), else every image is
    in memory. ``crops`` (with ``--crop``): the data decoded larger, as :class:`difflab.data.augment.RandomCrops`.
    ``labels``: a folder's sub-folders as classes even when the run did not ask for them (evaluation's judge)."""
    name = cfg.data if name is None else name
    kw: dict[str, Any] = {"labels": labels or cfg.labels or cfg.conditioning == "class", "background": cfg.background}
    if cfg.image_size:
        kw["image_size"] = cfg.image_size
    if cfg.image_channels:
        kw["channels"] = cfg.image_channels
    data = open_source(name, split=split, stream=stream, **kw)
    if not cfg.image_size and isinstance(data, ImageData):
        data = pad_as_trained(data, name)
    if not cfg.image_size and data.height % SIZE_MULTIPLE and dataset_key(name) is None:
        kw["image_size"] = -(-data.height // SIZE_MULTIPLE) * SIZE_MULTIPLE  # resized, never padded with black
        data = open_source(name, split=split, stream=stream, **kw)
    if data.height != data.width:
        raise UsageError(f"images must be square, got {data.height}x{data.width}; pass --image-size")
    if cfg.crop and crops:
        from difflab.data.augment import RandomCrops, larger_size

        kw["image_size"] = larger_size(data.height, cfg.crop)
        data = RandomCrops(open_source(name, split=split, stream=stream, **kw), data.height)
    return data


def load_as_trained(name: str, split: str, cfg: TrainConfig) -> ImageData:
    """``split`` of dataset or folder ``name`` in memory (uint8 tensors), transformed as run ``cfg`` trains
    (:func:`open_data`, without the random crops): what its samples are compared with, with a folder's
    sub-folders as classes when it has them (the evaluation classifier and accuracy need them)."""
    data = open_data(cfg, split, stream=False, crops=False, name=name, labels=True)
    assert isinstance(data, ImageData)
    return data


def load_data(cfg: TrainConfig, split: str = "train") -> ImageData:
    """The run's dataset in memory (uint8 tensors), as it trains (see :func:`open_data`)."""
    data = open_data(cfg, split, stream=False, crops=False)
    assert isinstance(data, ImageData)
    return data


def reference_data(name: str, split: str, like: TrainConfig | tuple[int, ...], notes: list[str] | None = None) -> ImageData:
    """The reference images that samples are evaluated against: ``split`` of dataset or folder ``name``
    (train when it has no test split, said in ``notes``), transformed as run ``like`` (a TrainConfig)
    trained, or, without a run (a diffusers folder, a samples file), fitted to samples of (C, H, W)
    ``like`` (:func:`load_fitted`)."""
    def one(s: str) -> ImageData:
        if isinstance(like, TrainConfig):
            return load_as_trained(name, s, like)
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
    """The images of dataset or folder ``name`` fitted to samples of (C, H, W) when no run says how it trained:
    padded by the shape rule (as in training: MNIST 28 -> 32), other sizes resized to H."""
    c, h, w = shape
    if dataset_key(name) is None:
        return load(name, split=split, image_size=h, channels=c)
    found = load(name, split=split, channels=c)
    if h == w:
        found = pad_as_trained(found, name, h)
    if (found.height, found.width) != (h, w):
        return load(name, split=split, channels=c, image_size=h)
    return found


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
                     prompts: Callable[[], Any] | None = None, captions: list[str] | None = None) -> Conditioner:
    """The run's condition: none, its class labels, or text prompts: the images' own ``captions`` (each
    distinct caption one condition, see :func:`difflab.data.captions.caption_ids`), else the classes' captions,
    else (sampling a run trained on its images' captions) the prompts its cache holds. ``prompts()`` makes
    the :class:`difflab.text.PromptCache`, called for text runs only."""
    if cfg.conditioning != "text":
        return Conditioner(cfg.conditioning, num_classes, cfg.cond_drop)
    from difflab.data.captions import caption_ids, captions_for
    from difflab.text import is_null

    if prompts is None:
        raise UsageError("text conditioning needs a text encoder")
    if captions is not None:
        distinct, _ = caption_ids(captions)
        return Conditioner("text", len(distinct), cfg.cond_drop, [[c] for c in distinct], prompts())
    if class_names is not None:
        return Conditioner("text", num_classes, cfg.cond_drop, captions_for(data_name, class_names), prompts())
    cache = prompts()
    saved = [p for p in cache.prompts if not is_null(p)]
    if not saved:
        raise UsageError("--conditioning text needs captions (a metadata.jsonl with a text field) or labelled data "
                         "(class names become captions)")
    return Conditioner("text", len(saved), cfg.cond_drop, [[p] for p in saved], cache)


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
