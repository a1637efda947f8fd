"""difflab interpolate: slerp between the latents of two seeds or two images, decoded by DDIM."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from difflab.checks import MAX_SEED, check_values
from difflab.errors import DataError, UsageError
from difflab.files import check_output
from difflab.samplers import SPACINGS


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, help="run folder written by 'difflab train' (a Gaussian run)")
    ends = p.add_mutually_exclusive_group(required=True)
    ends.add_argument("--seeds", type=int, nargs=2, metavar=("A", "B"),
                      help="two seeds: the starting noise of sample 0 of 'difflab sample --seed A' and B")
    ends.add_argument("--images", nargs=2, metavar=("A.png", "B.png"),
                      help="two image files, DDIM-inverted to their latents (fitted to the run's size)")
    p.add_argument("--n", type=int, default=10, help="images along the path, ends included (default 10)")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps (default 50)")
    p.add_argument("--spacing", choices=SPACINGS, default="uniform",
                   help="noise-level grid (default uniform)")
    p.add_argument("--class", dest="class_label", type=int, default=None,
                   help="class index for class-conditional runs (default: the null condition)")
    p.add_argument("--out", default=None, help="PNG strip (default RUN/samples/interpolate.png)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda")
    p.add_argument("--force", action="store_true", help="replace an --out file that exists")


def _read_image(path: str, shape: tuple[int, int, int]) -> torch.Tensor:
    from PIL import UnidentifiedImageError

    from difflab.data.folder import decode

    if not Path(path).is_file():
        raise UsageError(f"--images: {path} is not a file")
    try:
        return torch.from_numpy(decode(Path(path), shape[1], shape[0]).copy())
    except (UnidentifiedImageError, OSError) as e:
        raise DataError(f"--images: cannot read {path} as an image ({e})") from e


def run(args: argparse.Namespace) -> int:
    from difflab.cli.rundata import gaussian_run
    from difflab.figures import save_rows
    from difflab.model import Model
    from difflab.runs.data import pick_device

    check_values({"--n": (args.n, 2, 10_000), "--steps": (args.steps, 1, 100_000),
                  **{f"--seeds {ab}": (s, 0, MAX_SEED) for ab, s in zip("AB", args.seeds or ())}})
    out = check_output(args.out or Path(args.run) / "samples" / "interpolate.png", "--out", force=args.force,
                       own=args.out is None)
    model = Model(gaussian_run(args.run, pick_device(args.device), "interpolate"))
    ends = args.seeds or [_read_image(p, model.shape) for p in args.images]
    x = model.interpolate(*ends, args.n, steps=args.steps, spacing=args.spacing, label=args.class_label)
    out = save_rows([x], out)
    print(f"strip: {out} ({args.n} images, slerp from {' to '.join(map(str, args.seeds or args.images))})")
    return 0
