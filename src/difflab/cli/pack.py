"""difflab pack: write a data set (a folder, a built-in set, another packed set) as .npy shards
that ``difflab train --data DIR`` streams (see difflab.data.shards)."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", metavar="SRC", help="a data set name (mnist, ...) or a folder of images")
    p.add_argument("--out", required=True, help="the folder to write (new or empty, or a packed set with --force)")
    p.add_argument("--image-size", type=int, default=0, help="resize images to this size (0: as training would)")
    p.add_argument("--image-channels", type=int, default=0, choices=(0, 1, 3), help="1 or 3 channels (0: the data's)")
    p.add_argument("--split", default="train", choices=("train", "test"), help="which split to pack")
    p.add_argument("--force", action="store_true", help="replace a packed set already in --out")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from difflab.config import TrainConfig
    from difflab.data import shards
    from difflab.errors import UsageError
    from difflab.runs.data import open_data

    out = Path(args.out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not shards.is_packed(out):
            raise UsageError(f"--out {out} exists and is not an empty folder; choose a new one")
        if not args.force:
            raise UsageError(f"--out {out} already holds a packed set; pass --force to replace it")
    cfg = TrainConfig(data=args.source, image_size=args.image_size, image_channels=args.image_channels)
    source = open_data(cfg, args.split)  # the shape training would use: --image-size, else MNIST padded to 32
    index = shards.pack(source, out)
    c, h, w = source.shape
    print(f"pack: {index.parent} ({len(source)} images {c}x{h}x{w}"
          f"{f', {source.num_classes} classes' if source.num_classes else ''}); train with --data {index.parent}")
    return 0
