"""Named network configurations: ``PRESETS[name]`` is a config that ``difflab.nets.build`` accepts.

Presets leave ``out_channels`` out, so it follows ``in_channels`` (``from_preset("mnist", in_channels=3)``).

The series presets set ``time_scale`` to the series' number of steps T (override it with yours).
The small UNet presets use ADM's scale-shift conditioning: with only a few channels per GroupNorm group, an
embedding *added* before the norm (DDPM) is largely normalised away, with one channel per group entirely.

==============  =========================================================================
ddpm-cifar10    Ho et al. (2020) CIFAR-10 network, 35,746,307 parameters (32x32x3), = diffusers' twin
mnist           32x32x1 MNIST on a GPU, 7.3M parameters, 9.1 GFLOP per image forward+backward
mnist-small     32x32x1 MNIST on a 2-core CPU, 717k parameters, 0.57 GFLOP per image forward+backward
tiny            12.5k parameters, for tests (milliseconds per call)
cpu-32 ...      networks sized to an image size and a device (``SIZED`` below; ``difflab.nets.fit`` picks one)
series-alg1     the series' CoordConv UNet for naive algorithm 1: channels (8, 16, 24), T = 60, 72k parameters
series-alg2     the series' CoordConv UNet for naive algorithm 2: channels (16, 32, 64), T = 32*32, 399k params
==============  =========================================================================
"""

from __future__ import annotations

import inspect
from typing import Any

from .unet import UNet

PRESETS: dict[str, dict[str, Any]] = {
    "ddpm-cifar10": {
        "kind": "unet", "in_channels": 3, "model_channels": 128, "channel_mult": [1, 2, 2, 2],
        "num_res_blocks": 2, "attention_resolutions": [16], "num_heads": 1, "head_channels": -1, "dropout": 0.1,
        "image_size": 32, "num_classes": None, "context_dim": None, "use_scale_shift_norm": False, "norm_groups": 32,
    },
    "mnist": {
        "kind": "unet", "in_channels": 1, "model_channels": 64, "channel_mult": [1, 2, 2],
        "num_res_blocks": 2, "attention_resolutions": [16, 8], "num_heads": 1, "head_channels": 32, "dropout": 0.1,
        "image_size": 32, "num_classes": None, "context_dim": None, "use_scale_shift_norm": True, "norm_groups": 32,
    },
    "mnist-small": {
        "kind": "unet", "in_channels": 1, "model_channels": 16, "channel_mult": [1, 2, 4],
        "num_res_blocks": 1, "attention_resolutions": [8], "num_heads": 1, "head_channels": 32, "dropout": 0.0,
        "image_size": 32, "num_classes": None, "context_dim": None, "use_scale_shift_norm": True, "norm_groups": 16,
    },
    "tiny": {
        "kind": "unet", "in_channels": 1, "model_channels": 4, "channel_mult": [1, 2],
        "num_res_blocks": 1, "attention_resolutions": [16], "num_heads": 1, "head_channels": -1, "dropout": 0.0,
        "image_size": 32, "num_classes": None, "context_dim": None, "use_scale_shift_norm": True, "norm_groups": 32,
    },
    "series-alg1": {
        "kind": "coordconv_unet", "in_channels": 1, "channels": [8, 16, 24], "num_res_blocks": 1,
        "time_scale": 60.0, "dropout": 0.0,
    },
    "series-alg2": {
        "kind": "coordconv_unet", "in_channels": 1, "channels": [16, 32, 64], "num_res_blocks": 1,
        "time_scale": 1024.0, "dropout": 0.0,
    },
}  # fmt: skip

# Networks that grow with the image: a level per doubling, so that the lowest level is 8x8 (4x4 below 32 px),
# self-attention at the 16 and 8 px levels (and in the middle block), scale-shift conditioning. On a CPU the
# first (full-size) level is narrow, since it costs most of the FLOPs, and the width goes to the small levels,
# where parameters are cheap: no size gets fewer parameters than the one below it. "-wide" networks are for
# long runs (see fit.py). The GPU widths follow ADM's proportions (Dhariwal & Nichol 2021); not measured here.
# The CPU ones were measured on a 2-core EPYC (GFLOP per image forward+backward, images/s: nets/fit.py).
#   name            size  width  channel multipliers  blocks  head  groups
SIZED: dict[str, tuple[int, int, tuple[int, ...], int, int, int]] = {
    "cpu-32":       ( 32,   16,   (1, 2, 4),           1,      32,   16),
    "cpu-32-wide":  ( 32,   32,   (1, 2, 4),           1,      32,   32),
    "cpu-64":       ( 64,   16,   (1, 2, 4, 8),        1,      32,   16),
    "cpu-64-wide":  ( 64,   32,   (1, 2, 4, 8),        1,      32,   32),
    "cpu-128":      (128,   16,   (1, 2, 4, 8, 8),     1,      32,   16),
    "cpu-128-wide": (128,   32,   (1, 2, 4, 8, 8),     1,      32,   32),
    "cpu-256":      (256,   16,   (1, 1, 2, 4, 8, 8),  1,      32,   16),
    "cpu-256-wide": (256,   32,   (1, 1, 2, 4, 8, 8),  1,      32,   32),
    "gpu-32-wide":  ( 32,  192,   (1, 2, 2, 2),        2,      64,   32),
    "gpu-64":       ( 64,  128,   (1, 2, 2, 4),        2,      64,   32),
    "gpu-64-wide":  ( 64,  192,   (1, 2, 3, 4),        2,      64,   32),
    "gpu-128":      (128,  128,   (1, 1, 2, 3, 4),     2,      64,   32),
    "gpu-128-wide": (128,  192,   (1, 1, 2, 3, 4),     2,      64,   32),
    "gpu-256":      (256,  128,   (1, 1, 2, 2, 4, 4),  2,      64,   32),
    "gpu-256-wide": (256,  192,   (1, 1, 2, 2, 4, 4),  2,      64,   32),
}  # fmt: skip


def _sized(size: int, width: int, mults: tuple[int, ...], blocks: int, head: int, groups: int) -> dict[str, Any]:
    return {
        "kind": "unet", "in_channels": 3, "model_channels": width, "channel_mult": list(mults), "num_res_blocks": blocks,
        "attention_resolutions": [16, 8], "num_heads": 1, "head_channels": head, "dropout": 0.0,
        "image_size": size, "num_classes": None, "context_dim": None, "use_scale_shift_norm": True,
        "norm_groups": groups,
    }  # fmt: skip


PRESETS.update({name: _sized(*row) for name, row in SIZED.items()})


def diffusers_twin_kwargs(preset_name: str, **overrides: Any) -> dict[str, Any]:
    """``diffusers.UNet2DModel`` keyword arguments for the same architecture as a ``unet`` preset.

    Used by the benchmarks and by ``difflab export`` (which imports diffusers, lazily). The twin
    has the same layers, widths, time embedding (DDPM sinusoid, ``flip_sin_to_cos=False, freq_shift=1``),
    normalisation and parameter count; only the initialisation differs (difflab zero-initialises the last
    conv of each residual branch, the attention outputs and the output conv).
    """
    return twin_kwargs({**PRESETS[preset_name], **overrides}, preset_name)


def twin_kwargs(config: dict[str, Any], name: str = "this network") -> dict[str, Any]:
    """``diffusers.UNet2DModel`` keyword arguments for a ``unet`` network config (``net.config``);
    ValueError, naming what differs, for a network the twin cannot be."""
    defaults = {k: p.default for k, p in inspect.signature(UNet).parameters.items()}
    config = {**defaults, **config}
    out_channels = config["in_channels"] if config["out_channels"] is None else config["out_channels"]
    if config["kind"] != "unet":
        raise ValueError(
            f"{name} is a {config['kind']}; only 'unet' networks have a diffusers twin"
        )
    if config["context_dim"] is not None:
        raise ValueError("the diffusers twin (UNet2DModel) has no cross-attention; use context_dim=None")
    mc, mults = config["model_channels"], config["channel_mult"]
    widths = [mc * m for m in mults]
    groups = config["norm_groups"]
    if any(w % groups for w in widths):
        raise ValueError(
            f"UNet2DModel uses one GroupNorm group count: the twin needs widths divisible by {groups}"
        )
    sizes = [config["image_size"] // 2**i for i in range(len(mults))]
    attn = [s in config["attention_resolutions"] for s in sizes]
    if config["head_channels"] > 0:
        head_dim = config["head_channels"]
    elif config["num_heads"] == 1:
        head_dim = None  # one head, as wide as the layer
    else:
        raise ValueError(
            "the diffusers twin needs num_heads=1 or head_channels > 0 (one head width for all layers)"
        )
    kwargs: dict[str, Any] = {
        "sample_size": config["image_size"], "in_channels": config["in_channels"], "out_channels": out_channels,
        "block_out_channels": tuple(widths), "layers_per_block": config["num_res_blocks"],
        "down_block_types": tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        "up_block_types": tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
        "attention_head_dim": head_dim, "norm_num_groups": groups, "attn_norm_num_groups": groups, "norm_eps": 1e-5,
        "act_fn": "silu", "time_embedding_type": "positional", "flip_sin_to_cos": False, "freq_shift": 1, "downsample_padding": 1,
        "resnet_time_scale_shift": "scale_shift" if config["use_scale_shift_norm"] else "default",
        "dropout": config["dropout"], "add_attention": True,
    }  # fmt: skip
    if config["num_classes"] is not None:
        kwargs["num_class_embeds"] = config["num_classes"] + 1
    return kwargs
