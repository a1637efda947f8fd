"""difflab edit: SDEdit an image at a strength, or with --mask repaint a region (RePaint), with a run's sampler."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from difflab.checks import check_values
from difflab.errors import UsageError
from difflab.files import check_output
from difflab.samplers import SPACINGS

MAX_BYTES = 64 << 20  # an image file larger than this is not an image for a diffusion run


def add_arguments(p: argparse.ArgumentParser) -> None:
    from difflab.samplers import SAMPLERS

    p.add_argument("--run", required=True, help="run folder written by 'difflab train' (a Gaussian run)")
    p.add_argument("--image", required=True, help="the image to edit (PNG, JPEG, ...), of the run's size")
    p.add_argument("--mask", default=None, help="an image of the same size: white pixels are repainted (RePaint), "
                   "black ones kept; without it, SDEdit changes the whole image")
    p.add_argument("--strength", type=float, default=None, help="how far to noise the image, as a share of the "
                   "sampler's grid: 0 gives the image back, 1 a fresh sample (default 0.5; with --mask 1)")
    p.add_argument("--jump-length", type=int, default=10, help="RePaint: steps between jumps back up (default 10)")
    p.add_argument("--resample", type=int, default=None, help="RePaint: passes over each jump (default 4; 1: no "
                   "resampling; the paper's 10)")
    p.add_argument("--n", type=int, default=1, help="edits of the image to draw (default 1; edit j depends only on "
                   "(seed, j))")
    p.add_argument("--seed", type=int, default=0, help="seed")
    p.add_argument("--sampler", default=None, choices=sorted(SAMPLERS), help="sampler (default: the run's; with "
                   "--mask ddpm, 50 steps)")
    p.add_argument("--steps", type=int, default=None, help="steps of the sampler's whole grid (default: the run's)")
    p.add_argument("--class", dest="class_label", type=int, default=None, help="class to edit towards (class runs)")
    p.add_argument("--prompt", default=None, help="text prompt (text runs)")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (default: the run's)")
    p.add_argument("--clip", default=None, choices=["none", "clip", "dynamic"], help="x0 clipping (default: the run's)")
    p.add_argument("--eta", type=float, default=None, help="DDIM / DPM-Solver++ SDE eta")
    p.add_argument("--spacing", choices=SPACINGS, default=None,
                   help="noise-level grid (default: the sampler's own)")
    p.add_argument("--out", required=True, help="PNG to write: the edit (--n 1) or a grid of the edits")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")


def run(args: argparse.Namespace) -> int:
    import difflab
    from difflab.figures import save_grid, save_image
    from difflab.runs.data import pick_device

    check_values({"--n": (args.n, 1, 10_000), "--strength": (args.strength, 0, 1),
                  "--jump-length": (args.jump_length, 1, 100_000), "--resample": (args.resample, 1, 1000)})
    out = check_output(args.out, "--out", force=args.force)
    model = difflab.load(args.run, pick_device(args.device))
    c, h, w = model.shape
    image = read_image(args.image, "--image", (h, w), "L" if c == 1 else "RGB")
    mask = None if args.mask is None else read_image(args.mask, "--mask", (h, w), "L")
    settings = {k: getattr(args, k) for k in ("guidance", "clip", "eta", "spacing") if getattr(args, k) is not None}
    edits = model.edit(image.expand(args.n, -1, -1, -1), strength=args.strength, mask=mask, seed=args.seed,
                       sampler=args.sampler, steps=args.steps, jump_length=args.jump_length, resample=args.resample,
                       labels=args.class_label, prompt=args.prompt, **settings)
    if args.n == 1:
        save_image(edits[0].permute(1, 2, 0).numpy(), out)
    else:
        save_grid(edits, out)
    print(f"{'edit' if args.n == 1 else 'edits'}: {out}")
    return 0


def read_image(path: str | Path, flag: str, size: tuple[int, int], mode: str) -> torch.Tensor:
    """An image file as uint8 [1, C, H, W] (``mode`` L: C = 1, RGB: C = 3), which must be ``size`` (H, W)."""
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if not p.is_file():
        raise UsageError(f"{flag} {path} is not a file")
    if p.stat().st_size > MAX_BYTES:
        raise UsageError(f"{flag} {path} is larger than {MAX_BYTES >> 20} MiB; give an image of the run's size")
    try:
        with Image.open(p) as im:
            if (im.height, im.width) != size:
                raise UsageError(f"{flag} {path} is {im.width}x{im.height}; this run draws {size[1]}x{size[0]} images "
                                 f"(resize or crop it first)")
            array = np.asarray(im.convert(mode), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise UsageError(f"{flag} {path} is not an image PIL can read ({type(e).__name__})") from None
    a = torch.from_numpy(array.copy())
    return (a[None] if a.ndim == 2 else a.permute(2, 0, 1))[None]
