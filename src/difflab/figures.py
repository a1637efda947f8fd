"""Pictures a reader wants to look at: sample grids, strips (noising chains,
trajectories, interpolations) and loss curves."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from difflab.files import atomic_write


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Model units ([-1, 1]) to uint8 [N, C, H, W] (rounded and clamped)."""
    if x.dtype == torch.uint8:
        return x
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def grid(images: torch.Tensor, nrow: int | None = None, pad: int = 2, pad_value: int = 255) -> np.ndarray:
    """Tile [N, C, H, W] images (uint8 or model units) into one H x W x C uint8 array."""
    images = to_uint8(images.detach().cpu())
    n, c, h, w = images.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(n)))
    ncol = math.ceil(n / nrow)
    out = np.full((ncol * (h + pad) + pad, nrow * (w + pad) + pad, c), pad_value, dtype=np.uint8)
    arr = images.permute(0, 2, 3, 1).numpy()
    for i in range(n):
        r, q = divmod(i, nrow)
        out[pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = arr[i]
    return out


def pil_image(array: np.ndarray) -> Image.Image:
    """An H x W x C uint8 array as a PIL image (mode L for one channel, RGB for three)."""
    return Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)


def save_image(array: np.ndarray, path: str | Path, scale: int = 1) -> Path:
    """Save an H x W x C uint8 array as PNG (nearest-neighbour upscaled by ``scale``)."""
    img = pil_image(array)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    return atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None, scale: int = 2) -> Path:
    """A PNG grid of samples."""
    return save_image(grid(images, nrow), path, scale)


def save_rows(rows: list[torch.Tensor], path: str | Path, scale: int = 2) -> Path:
    """A PNG whose row i shows the images of rows[i] ([K, C, H, W] each, K equal): strips of noising
    chains, denoising trajectories or interpolations."""
    k = rows[0].shape[0]
    return save_grid(torch.cat([to_uint8(r.detach().cpu()) for r in rows]), path, nrow=k, scale=scale)


def plot_loss(csv_path: str | Path, png_path: str | Path) -> Path | None:
    """Plot the loss CSV (columns step, loss, ...) on a log scale with a moving average, and the KID or FID
    of the evaluated steps (--eval-every) on a second axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, losses, evals = [], [], {}
    with open(csv_path) as f:
        for row in csv.DictReader(f):
            steps.append(int(row["step"]))
            losses.append(float(row["loss"]))
            for metric in ("kid", "fid"):  # --eval-every; logs of older versions have no such columns
                if row.get(metric):
                    evals.setdefault(metric, []).append((steps[-1], float(row[metric])))
    if not steps:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=110)
    ax.plot(steps, losses, lw=0.8, alpha=0.5, label="loss")
    if len(losses) >= 5:
        k = max(2, len(losses) // 20)
        smooth = np.convolve(losses, np.ones(k) / k, mode="valid")
        ax.plot(steps[k - 1:], smooth, lw=1.8, label=f"moving average ({k} logs)")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left")
    metric = next(iter(evals), None)  # the first a run logged (--eval-metric may change on a resume)
    if metric is not None:
        other = ax.twinx()
        other.plot(*zip(*evals[metric]), "o-", color="tab:red", ms=3, lw=1, label=metric.upper())
        other.set_ylabel(metric.upper(), color="tab:red")
        other.legend(loc="upper right")
    fig.tight_layout()
    try:
        return atomic_write(png_path, lambda tmp: fig.savefig(tmp, format="png"))
    finally:
        plt.close(fig)
