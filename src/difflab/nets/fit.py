"""Fitting a network to the data, the device and the budget.

- :func:`network_config`: the network a run trains (``--model NAME``, the method's own network, or for
  ``--model auto`` the preset :func:`auto_preset` picks from :data:`CHOICES`), fitted to the data's shape.
- :func:`cost`: its parameters and GFLOP per image (forward + backward, counted once on the meta device).
- :func:`expected_images_per_second`: the training speed that cost gives on a device, and
  :func:`speed_warning`: one paragraph, before the first step, when that speed makes the run unusable.
"""

from __future__ import annotations

import functools
import inspect
import json
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch

from difflab.config import channel_widths
from difflab.errors import UsageError
from difflab.recipe import native_bf16

from . import build
from .presets import PRESETS

if TYPE_CHECKING:
    from difflab.config import TrainConfig

SIZES = (32, 64, 128, 256)
# The preset ``--model auto`` trains, by device and budget, for 32, 64, 128 and 256 px (other sizes take the
# nearest column; SIZED in presets.py has the shapes). One entry to change to choose another network.
#   (device, budget)     32 px           64 px           128 px           256 px
CHOICES: dict[tuple[str, str], tuple[str, str, str, str]] = {
    ("cpu", "short"):   ("mnist-small",  "cpu-64",       "cpu-128",       "cpu-256"),
    ("cpu", "long"):    ("cpu-32-wide",  "cpu-64-wide",  "cpu-128-wide",  "cpu-256-wide"),
    ("gpu", "short"):   ("ddpm-cifar10", "gpu-64",       "gpu-128",       "gpu-256"),
    ("gpu", "long"):    ("gpu-32-wide",  "gpu-64-wide",  "gpu-128-wide",  "gpu-256-wide"),
}  # fmt: skip
# Colour 32 px on a CPU trains mnist-small: against cpu-32 (the same widths with attention at 16 px too), ten
# minutes on the textures gave the same KID within noise (84.1 against 82.8) with 16% more steps
# (bench/RESULTS.md, "Network for colour 32 px on a CPU").
# Grey 32 px images (MNIST) keep the networks the project's MNIST benchmarks were measured with.
GREY_32 = {"cpu": "mnist-small", "gpu": "mnist"}
# A long budget, which affords a wider network: at least this many steps, and no time limit or a long one.
LONG_STEPS, LONG_MINUTES = 50_000, 120.0
# A time limit too short for a network: fewer than MIN_STEPS steps of it by the expected speed. The network then
# gives way to the smaller one of SMALLER, taken as it is (its own attention levels). Measured at 64 px on the
# textures, 20 minutes on a 2-core Xeon (bench/RESULTS.md, "The 64 px network"): cpu-64 made 1,358 steps, KID x 1e3
# 115.6; mnist-small 2,361 steps, 55.7. The recipe's other settings were measured at 2,400-3,100 steps, hence the
# bound; where between 20 minutes and the bound (about 50 minutes for cpu-64 here) the two cross was not measured.
MIN_STEPS = 3_000
SMALLER = {"cpu-64": "mnist-small"}

# Training throughput, in FLOP/s of forward + backward work on one CPU thread: the trainer's own step on a 2-core
# Xeon with AMX, timed by the process's CPU time with one thread (steady on a shared machine, where wall time is
# not). bf16: 87 to 256 GFLOP/s over eleven networks from mnist-small to cpu-256, 0.6 to 49 GFLOP per image,
# batch 4 to 64 (16 channels wide at the low end, 32 to 48 at the high end); fp32: 63 to 76 on the narrow ones.
# Threads add less than linearly: two train mnist-small 1.06x faster than one (bench/RESULTS.md, the EPYC), larger
# networks up to 2x, so the estimate takes the square root of the thread count. Within about 2x on such a CPU.
CPU_FLOPS_PER_THREAD = {"bf16": 140e9, "fp32": 70e9}
# ddpm-cifar10 on an H100 (132 SMs), bf16 without compile: 1,542 images/s x 37.3 GFLOP (bench/RESULTS.md);
# other GPUs by their number of SMs (a rough guide: clocks and memory differ).
GPU_FLOPS, GPU_SMS = 57.5e12, 132

# Unusable: a step longer than this, or fewer steps than this within the time limit.
SLOW_STEP_SECONDS, FEW_STEPS = 3.0, 300


class _Shape(Protocol):
    """What fitting needs of the data (``difflab.data.ImageData`` has it)."""

    channels: int
    height: int
    width: int
    num_classes: int | None


def device_class(device: torch.device) -> str:
    """``"cpu"`` or ``"gpu"`` (CUDA, MPS): the rows of :data:`CHOICES`."""
    return "cpu" if device.type == "cpu" else "gpu"


def budget(cfg: TrainConfig) -> str:
    """``"long"`` for a run of at least LONG_STEPS steps with no time limit or one of at least LONG_MINUTES,
    else ``"short"``."""
    long_time = not cfg.time_limit or cfg.time_limit >= LONG_MINUTES
    return "long" if cfg.steps >= LONG_STEPS and long_time else "short"


def auto_preset(channels: int, size: int, device: torch.device, cfg: TrainConfig) -> str:
    """The preset ``--model auto`` trains on ``size``-pixel images of ``channels`` channels: the column of
    :data:`CHOICES` nearest in scale (log2), capped at 32 and 256 px, or the smaller network of
    :data:`SMALLER` when the time limit leaves that one fewer than :data:`MIN_STEPS` steps."""
    return _auto(channels, size, device, cfg)[0]


def _auto(channels: int, size: int, device: torch.device, cfg: TrainConfig) -> tuple[str, bool]:
    """:func:`auto_preset`'s choice, and whether its attention levels follow the image size (False for the
    smaller network a short time limit takes, which trains as it was measured)."""
    kind = device_class(device)
    column = min(range(len(SIZES)), key=lambda i: abs(math.log2(size / SIZES[i])))
    if channels == 1 and column == 0:
        return GREY_32[kind], True
    name = CHOICES[kind, budget(cfg)][column]
    if name in SMALLER and cfg.time_limit and expected_steps(name, channels, size, device, cfg) < MIN_STEPS:
        return SMALLER[name], False
    return name, True


def expected_steps(name: str, channels: int, size: int, device: torch.device, cfg: TrainConfig) -> float:
    """Steps of the preset ``name`` (fitted to ``size``-pixel images) within ``cfg.time_limit`` by the
    expected speed (infinite without a time limit or a known speed)."""
    conf = _fitted(name, channels, size, size)
    gflop = cost(conf, (channels, size, size)).gflop
    precision = cfg.precision if cfg.precision != "auto" else "bf16" if native_bf16(device) else "fp32"
    ips = None if gflop is None else expected_images_per_second(gflop, device, precision)
    return cfg.time_limit * 60 * ips / cfg.batch_size if cfg.time_limit and ips else math.inf


def _fitted(name: str, channels: int, height: int, width: int, follow: bool = True) -> dict[str, Any]:
    """The preset ``name`` for images of that shape; with ``follow`` its attention at the same levels (unet
    presets), else at the preset's own resolutions."""
    conf = dict(PRESETS[name], in_channels=channels, out_channels=channels)
    if conf["kind"] == "unet":
        if follow:
            levels = len(conf["channel_mult"])
            conf["attention_resolutions"] = [height // 2**i for i in range(levels)
                                             if conf["image_size"] // 2**i in conf["attention_resolutions"]]
        conf["image_size"] = height
    return conf


def network_config(cfg: TrainConfig, data: _Shape, device: torch.device, context_dim: int | None,
                   preset: str | None = None) -> dict[str, Any]:
    """The network a run trains: ``--model``, or the method's ``preset``, or the one :func:`auto_preset`
    picks for the data, the device and the budget, fitted to the data's shape."""
    name, fitted = cfg.model, False
    if name == "auto":
        if preset is not None:
            name = preset
        else:
            name, fitted = _auto(data.channels, max(data.height, data.width), device, cfg)
    if name not in PRESETS:
        raise UsageError(f"unknown --model '{name}'; choose auto or one of {', '.join(PRESETS)}")
    # attention stays at the same levels when the images are not the preset's size (a fitted choice)
    conf = _fitted(name, data.channels, data.height, data.width, follow=fitted)
    if conf["kind"] == "unet":
        conf["attention_resolutions"] = [r for r in conf["attention_resolutions"] if r <= data.height]
        if cfg.conditioning == "class":
            conf["num_classes"] = data.num_classes
        if cfg.conditioning == "text":
            conf["context_dim"] = context_dim
    if cfg.channels_mult:
        widths = channel_widths(cfg.channels_mult)
        if conf["kind"] == "unet":
            if any(w % widths[0] for w in widths):
                raise UsageError("--channels-mult for a UNet: every width must be a multiple of the first")
            conf.update(model_channels=widths[0], channel_mult=[w // widths[0] for w in widths])
        else:
            conf["channels"] = widths
    if conf["kind"] == "unet":  # (after --channels-mult, which may change the number of levels)
        check_divisible(data.height, data.width, len(conf["channel_mult"]), name)
    if cfg.dropout >= 0:
        conf["dropout"] = cfg.dropout
    if conf["kind"] == "unet" and conf.get("head_channels", -1) > 0:
        # small images put attention on narrow levels (digits, 8x8: a 16-wide one): heads narrow to fit
        sizes = [conf["image_size"] // 2**i for i in range(len(conf["channel_mult"]))]
        widths = [conf["model_channels"] * m for m, s in zip(conf["channel_mult"], sizes)
                  if s in conf["attention_resolutions"]]
        conf["head_channels"] = math.gcd(conf["head_channels"], *widths, conf["model_channels"] * conf["channel_mult"][-1])
    return conf


def check_divisible(height: int, width: int, levels: int, name: str) -> None:
    """UsageError, naming the nearest sizes that fit, unless a ``levels``-level network can halve both sides
    ``levels - 1`` times."""
    factor = 2 ** (levels - 1)
    for side in (height, width):
        if side % factor:
            below, above = side // factor * factor, (side // factor + 1) * factor
            fits = f"{below} or {above}" if below else f"{above}"
            raise UsageError(f"image size {side} is not divisible by {factor} (the {name} network downsamples "
                             f"{levels - 1} times); pass --image-size {fits}")


@dataclass(frozen=True)
class Cost:
    """A network's size and work: ``gflop`` per image for one training step (forward and backward)."""

    parameters: int
    gflop: float | None  # None for a network that cannot run on the meta device


def cost(config: dict[str, Any], shape: tuple[int, int, int]) -> Cost:
    """Parameters and GFLOP per image (forward + backward, matrix and convolution work as torch's
    ``FlopCounterMode`` counts it) of the network ``config`` on images of ``shape`` (C, H, W).

    Counted on the meta device (no memory, no arithmetic: milliseconds) and cached per config."""
    return _cost(json.dumps(config, sort_keys=True), tuple(shape))


@functools.lru_cache(maxsize=64)
def _cost(config_json: str, shape: tuple[int, int, int]) -> Cost:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        net = build(json.loads(config_json))
        parameters = sum(p.numel() for p in net.parameters())
        x, t = torch.zeros(2, *shape), torch.zeros(2)  # two images: a batch norm (the judge CNN) needs more than one
        args = (x, t) if len(inspect.signature(net.forward).parameters) > 1 else (x,)  # a classifier takes images alone
        try:
            with FlopCounterMode(display=False) as counter:
                net(*args).float().square().mean().backward()
        except (RuntimeError, NotImplementedError):  # a registered network that needs real tensors
            return Cost(parameters, None)
    return Cost(parameters, counter.get_total_flops() / 2e9)


def expected_images_per_second(gflop: float, device: torch.device, precision: str) -> float | None:
    """Training images per second that ``gflop`` per image gives on ``device`` (None where no throughput is
    known: MPS). A guide within about a factor of two, from one measured throughput per kind of device."""
    if device.type == "cpu":
        flops = CPU_FLOPS_PER_THREAD["bf16" if precision == "bf16" else "fp32"] * math.sqrt(torch.get_num_threads())
    elif device.type == "cuda":
        flops = GPU_FLOPS * torch.cuda.get_device_properties(device).multi_processor_count / GPU_SMS
    else:
        return None
    return flops / (gflop * 1e9)


def speed_warning(cfg: TrainConfig, config: dict[str, Any], shape: tuple[int, int, int], device: torch.device,
                  world: int = 1) -> str | None:
    """One paragraph saying that the run will be unusably slow, and what to do instead; None if it will not
    (or where no speed is known). Slow: a step over SLOW_STEP_SECONDS, or fewer than FEW_STEPS steps within
    ``--time-limit``. ``cfg.precision`` must be resolved (not "auto")."""
    gflop = cost(config, shape).gflop
    ips = None if gflop is None else expected_images_per_second(gflop, device, cfg.precision)
    if ips is None:
        return None
    step = cfg.batch_size / (ips * world)
    within = cfg.time_limit * 60 / step if cfg.time_limit else math.inf
    if step <= SLOW_STEP_SECONDS and (within >= FEW_STEPS or within >= cfg.steps):
        return None
    if cfg.time_limit:
        limit = f" and about {within:,.0f} steps within --time-limit {cfg.time_limit:g}"
    else:
        limit = f" and {cfg.steps:,} steps would take {_duration(cfg.steps * step)}"
    instead = []
    size = max(shape[1:])
    if size > 64:  # the network --model auto fits to 64 px, or this one
        if cfg.model == "auto" and config["kind"] == "unet":
            name, fitted = _auto(shape[0], 64, device, cfg)
            small = _fitted(name, shape[0], 64, 64, follow=fitted)
        else:
            small = dict(config, image_size=64)
        gflop64 = cost(small, (shape[0], 64, 64)).gflop or math.inf
        step64 = cfg.batch_size / ((expected_images_per_second(gflop64, device, cfg.precision) or 0) * world)
        instead.append(f"--image-size 64 (about {_seconds(step64)} a step)")
    instead.append("a smaller --model or --channels-mult")
    if device.type == "cpu":
        instead.append("a GPU (--device cuda)")
    if cfg.time_limit:
        instead.append(f"a longer --time-limit ({FEW_STEPS * step / 60:,.0f} minutes for {FEW_STEPS} steps)")
    return (f"warning: this run will be very slow: about {_seconds(step)} a step ({ips * world:.1f} images/s expected "
            f"on {device.type}){limit}, where diffusion needs thousands of steps to draw recognisable images. "
            f"The run goes on; to train faster use {', '.join(instead[:-1])} or {instead[-1]}.")


def _seconds(s: float) -> str:
    return f"{s:.1f} s" if s < 10 else f"{s:,.0f} s"


def _duration(s: float) -> str:
    return f"{s / 60:,.0f} minutes" if s < 7200 else f"{s / 3600:,.0f} hours"
