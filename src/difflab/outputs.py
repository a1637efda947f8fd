"""Sample outputs other tools read: a folder of one PNG per sample (what FID tools take), with the
sampling settings in each PNG's text chunk, and an animated GIF of the denoising path."""

from __future__ import annotations

import json
import re
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image, PngImagePlugin

from difflab.errors import UsageError
from difflab.figures import grid, pil_image, to_uint8
from difflab.files import atomic_write

SAMPLE_NAME = re.compile(r"^\d{6}\.png$")


def prepare_out_dir(folder: str | Path, force: bool = False) -> Path:
    """An output folder that is new, empty or holds only earlier samples; other files need ``force``."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"--out-dir {folder} is a file, not a folder")
    others = [p.name for p in folder.iterdir() if not SAMPLE_NAME.match(p.name)] if folder.exists() else []
    if others and not force:
        raise UsageError(f"--out-dir {folder} holds other files ({others[0]}, ...); choose an empty folder "
                         "or pass --force")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def save_sample_pngs(images: torch.Tensor, folder: str | Path, settings: dict, start: int = 0) -> list[Path]:
    """One PNG per sample, named by its seed index (``000017.png``), the settings (JSON) in its
    ``difflab`` text chunk."""
    folder = Path(folder)
    arr = to_uint8(images.cpu()).permute(0, 2, 3, 1).numpy()
    paths = []
    for i, a in enumerate(arr):
        info = PngImagePlugin.PngInfo()
        info.add_text("difflab", json.dumps({**settings, "index": start + i}, sort_keys=True, default=str))
        image = pil_image(a)
        # one fsync per sample would cost more than encoding it (about 1 ms a PNG here)
        paths.append(atomic_write(folder / f"{start + i:06d}.png", partial(image.save, format="PNG", pnginfo=info),
                                  durable=False))
    return paths


def read_sample_pngs(folder: str | Path) -> torch.Tensor:
    """The images of a sample folder (PNG files, sorted by name) as uint8 [N, C, H, W]."""
    files = sorted(Path(folder).glob("*.png"))
    if not files:
        raise UsageError(f"{folder} holds no PNG files")
    arrays = [np.asarray(Image.open(f)) for f in files]
    if len({a.shape for a in arrays}) != 1:
        raise UsageError(f"the PNG files in {folder} differ in size or channels")
    x = torch.from_numpy(np.stack(arrays))
    return (x[:, None] if x.ndim == 3 else x.permute(0, 3, 1, 2)).contiguous()


class Trajectory:
    """A sampler callback that keeps x_t and the predicted x0 of every step, saved as a GIF: each frame
    shows the samples' x_t above their x0 estimates."""

    def __init__(self) -> None:
        self.frames: list[np.ndarray] = []
        self.done = False

    def __call__(self, info: dict) -> None:
        self.done = self.done or (info["i"] == 0 and bool(self.frames))  # the first batch's path only
        if self.done:
            return
        x, x0 = info["x"].detach().float().cpu(), info["x0"].detach().float().cpu()
        self.frames.append(grid(torch.cat([x.clamp(-1, 1), x0]), nrow=len(x)))

    def save(self, path: str | Path, scale: int = 2, ms_per_frame: int = 120) -> Path:
        if not self.frames:
            raise UsageError("no sampler steps were recorded for --trajectory")
        imgs = [pil_image(f) for f in self.frames]
        imgs = [im.resize((im.width * scale, im.height * scale), Image.NEAREST) for im in imgs]
        return atomic_write(path, lambda tmp: imgs[0].save(tmp, format="GIF", save_all=True,
                                                           append_images=imgs[1:] + [imgs[-1]] * 5,
                                                           duration=ms_per_frame, loop=0))
