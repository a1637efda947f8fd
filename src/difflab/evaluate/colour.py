"""Colour statistics of images and how far samples are from their data's colours.

For uint8 images [N, C, H, W] (C = 3 RGB; C = 1 is grey, saturation 0) in HSV terms, with
V = max(r, g, b) / 255 and S = (max - min) / max (0 for black):

- ``saturation``: mean S over every pixel;
- ``brightness``: mean V over every pixel;
- ``hue_shares``: of the *saturated* pixels, the share whose hue falls in each sixth of the hue circle,
  each sixth centred on a primary or secondary colour (:data:`SIXTHS`: red is hue -30..30 degrees,
  yellow 30..90, ...); all zeros when no pixel is saturated;
- ``saturated``: the share of pixels that are saturated.

A pixel is saturated when S >= :data:`SATURATED` (0.25) and V >= :data:`BRIGHT_ENOUGH` (0.1). Below that
its hue is noise: the chroma max - min is then under 7 of 255 levels, so one level of rounding turns the
hue by 9 degrees or more, and near-grey or near-black pixels would spread over every sixth.

:func:`compare` measures samples against reference images with the targets of issue 23 ("A recipe proved
on colour data"): saturation and brightness within 15% of the reference's, and no sixth's share of the
saturated pixels off by more than 0.06.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from difflab.evaluate.inception import check_images

SIXTHS = ("red", "yellow", "green", "cyan", "blue", "magenta")
SATURATED = 0.25
BRIGHT_ENOUGH = 0.1
RELATIVE_TARGET = 0.15  # saturation and brightness within 15% of the reference's
HUE_TARGET = 0.06  # no sixth's share of the saturated pixels off by more than this
_CHUNK = 1 << 22  # pixels converted at a time (float64 temporaries of ~100 MB)


def _hsv_chunk(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(S, V, hue in sixths 0..6) of uint8 pixels [P, 3]; the hue is meaningless where max == min."""
    x = rgb.astype(np.float64)
    r, g, b = x[:, 0], x[:, 1], x[:, 2]
    hi, lo = x.max(axis=1), x.min(axis=1)
    chroma = hi - lo
    safe = np.where(chroma > 0, chroma, 1.0)
    hue = np.where(hi == r, ((g - b) / safe) % 6, np.where(hi == g, (b - r) / safe + 2, (r - g) / safe + 4))
    sat = np.where(hi > 0, chroma / np.where(hi > 0, hi, 1.0), 0.0)
    return sat, hi / 255, hue


def colour_stats(images: torch.Tensor | np.ndarray) -> dict[str, Any]:
    """Mean saturation and brightness, the share of saturated pixels and their shares per hue sixth
    (see the module docstring) of uint8 images [N, C, H, W], C = 1 or 3."""
    images = check_images(images, "images")
    if images.shape[1] not in (1, 3) or images.numel() == 0:
        raise ValueError(f"colour statistics need 1 or 3 channels and at least one pixel, got {tuple(images.shape)}")
    pixels = images.permute(0, 2, 3, 1).reshape(-1, images.shape[1]).numpy()
    if pixels.shape[1] == 1:
        pixels = np.repeat(pixels, 3, axis=1)
    sat_sum = value_sum = 0.0
    counts = np.zeros(len(SIXTHS), dtype=np.int64)
    for lo in range(0, len(pixels), _CHUNK):
        sat, value, hue = _hsv_chunk(pixels[lo:lo + _CHUNK])
        sat_sum, value_sum = sat_sum + float(sat.sum()), value_sum + float(value.sum())
        saturated = (sat >= SATURATED) & (value >= BRIGHT_ENOUGH)
        # each sixth is centred on its colour: red spans hue -0.5..0.5 (in sixths of the circle)
        sixth = np.floor(hue[saturated] + 0.5).astype(np.int64) % len(SIXTHS)
        counts += np.bincount(sixth, minlength=len(SIXTHS))
    total, n_saturated = len(pixels), int(counts.sum())
    shares = counts / n_saturated if n_saturated else np.zeros(len(SIXTHS))
    return {"saturation": sat_sum / total, "brightness": value_sum / total, "saturated": n_saturated / total,
            "hue_shares": dict(zip(SIXTHS, (float(s) for s in shares)))}


def _relative(value: float, reference: float) -> float:
    if reference == 0:
        return 0.0 if value == 0 else float("inf")
    return (value - reference) / reference


def compare(samples: torch.Tensor | np.ndarray, reference: torch.Tensor | np.ndarray | dict) -> dict[str, Any]:
    """How far the colours of ``samples`` are from those of ``reference`` (images, or their
    :func:`colour_stats`): both sides' statistics, the relative differences of saturation and brightness
    ((samples - reference) / reference), the largest difference of a hue sixth's share (and which sixth),
    and whether each is within issue 23's targets (``RELATIVE_TARGET``, ``HUE_TARGET``; ``ok``: all)."""
    fake = colour_stats(samples)
    real = reference if isinstance(reference, dict) else colour_stats(reference)
    diffs = {k: fake["hue_shares"][k] - real["hue_shares"][k] for k in SIXTHS}
    worst = max(SIXTHS, key=lambda k: abs(diffs[k]))
    out = {"samples": fake, "reference": real,
           "saturation_relative": _relative(fake["saturation"], real["saturation"]),
           "brightness_relative": _relative(fake["brightness"], real["brightness"]),
           "hue_max_difference": abs(diffs[worst]), "hue_worst_sixth": worst, "hue_differences": diffs}
    out["within_target"] = {"saturation": abs(out["saturation_relative"]) <= RELATIVE_TARGET,
                            "brightness": abs(out["brightness_relative"]) <= RELATIVE_TARGET,
                            "hue": out["hue_max_difference"] <= HUE_TARGET}
    out["ok"] = all(out["within_target"].values())
    return out


def describe(result: dict[str, Any]) -> str:
    """A :func:`compare` result in one line."""
    s, r = result["samples"], result["reference"]
    return (f"saturation {s['saturation']:.3f} (data {r['saturation']:.3f}, {result['saturation_relative']:+.0%}), "
            f"brightness {s['brightness']:.3f} (data {r['brightness']:.3f}, {result['brightness_relative']:+.0%}), "
            f"largest hue-sixth difference {result['hue_max_difference']:.3f} ({result['hue_worst_sixth']})"
            f"{'' if result['ok'] else ' [off target]'}")
