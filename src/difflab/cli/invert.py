"""difflab invert: DDIM-invert dataset images to latents, reconstruct them, report the error."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from difflab.errors import UsageError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, help="run folder written by 'difflab train' (a Gaussian run)")
    p.add_argument("--data", default=None, help="mnist, fashion-mnist, digits, emoji or a folder of images "
                   "(default: the run's dataset); images are fitted to the run's size and channels")
    p.add_argument("--split", default=None, help="train or test (default: test for named datasets, "
                   "the whole folder for a folder)")
    p.add_argument("--n", type=int, default=8, help="number of images, the first n of the split (default 8)")
    p.add_argument("--steps", type=int, default=100, help="DDIM steps each way (default 100)")
    p.add_argument("--spacing", choices=["uniform", "karras", "geometric"], default="uniform",
                   help="noise-level grid (default uniform, the grid of 'difflab sample --sampler ddim')")
    p.add_argument("--refine", type=int, default=0, help="fixed-point iterations per inversion step "
                   "(0: plain DDIM inversion; more make the round trip exact on any grid, one call each)")
    p.add_argument("--out", default=None, help="PNG strip, originals above reconstructions "
                   "(default RUN/samples/invert.png)")
    p.add_argument("--save-latents", default=None, help="write the latents as float32 [N, C, H, W] .npy in "
                   "standard-normal units, for 'difflab sample --init-noise FILE --sampler ddim' with the "
                   "same --steps")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward batch")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda")


def gaussian_run(path: str, device: torch.device, command: str):
    """The run at ``path``, which must be a Gaussian-diffusion run (the others have no ODE)."""
    from difflab.sampling import load_run

    run_ = load_run(path, device)
    if run_.cfg.method != "gaussian":
        raise UsageError(f"difflab {command} needs a Gaussian run (--method gaussian); {path} is a "
                         f"{run_.cfg.method} run")
    return run_


def default_split(data: str) -> str:
    """test for a named dataset, train (the whole folder unless it has train/ and test/) for a folder."""
    from difflab.data import DATASETS

    return "test" if data.strip().lower().replace("_", "-") in DATASETS else "train"


def run_images(data: str, split: str, shape: tuple[int, int, int], n: int):
    """The first ``n`` images of a dataset or folder as an ImageData fitted to a run's (C, H, W):
    MNIST-sized 28x28 sets are padded to 32 as in training, other sizes resized."""
    from difflab.data import DATASETS, load

    if n < 1:
        raise UsageError(f"--n must be at least 1, got {n}")
    c, h, w = shape
    if data.strip().lower().replace("_", "-") not in DATASETS:
        return load(data, split=split, image_size=h, channels=c).subset(n)
    found = load(data, split=split, channels=c)
    if (found.height, found.width) == (28, 28) and (h, w) == (32, 32):
        found = load(data, split=split, channels=c, pad_to=32)
    elif (found.height, found.width) != (h, w):
        found = load(data, split=split, channels=c, image_size=h)
    return found.subset(n)


def condition_fn(run_, data, device):
    """cond_fn(slice) for ``data`` under a conditional run: the images' own classes when the data
    carries the run's class names, else the null condition; None for unconditional runs."""
    conditioner = run_.conditioner
    if conditioner.kind == "none":
        return None
    labels = data.labels if data.labels is not None and data.class_names == run_.class_names else None

    def cond(sl: slice):
        if labels is None:
            return conditioner.null(sl.stop - sl.start, device)
        return conditioner.for_labels(labels[sl], device)

    return cond


def save_npy(array: np.ndarray, path: str | Path) -> Path:
    """Write ``array`` to ``path`` through a temporary file (never half-written)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, array)
    tmp.replace(path)
    return path


def run(args: argparse.Namespace) -> int:
    from difflab.figures import save_rows, to_uint8
    from difflab.latents import invert, reconstruct, reconstruction_error
    from difflab.train.trainer import pick_device

    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.refine < 0:
        raise UsageError(f"--refine must be 0 or more, got {args.refine}")
    device = pick_device(args.device)
    run_ = gaussian_run(args.run, device, "invert")
    name = args.data or run_.cfg.data
    data = run_images(name, args.split or default_split(name), run_.shape, args.n)
    den, cond_fn = run_.denoiser(), condition_fn(run_, data, device)
    x, latents, recon = data.to_model(device), [], []
    for lo in range(0, len(data), args.batch_size):
        sl = slice(lo, min(len(data), lo + args.batch_size))
        cond = cond_fn(sl) if cond_fn is not None else None
        z = invert(den, x[sl], args.steps, cond, spacing=args.spacing, refine=args.refine)
        latents.append(z.cpu())
        recon.append(to_uint8(reconstruct(den, z, args.steps, cond, spacing=args.spacing).cpu()))
    latents_t, recon_t = torch.cat(latents), torch.cat(recon)
    mse, psnr = reconstruction_error(data.images, recon_t)
    print(f"reconstruction of {len(data)} images ({args.steps} DDIM steps each way): "
          f"MSE {mse:.3f}, PSNR {psnr:.2f} dB ([0, 255] units)")
    out = save_rows([data.images, recon_t], args.out or Path(args.run) / "samples" / "invert.png")
    print(f"strip: {out} (originals above, reconstructions below)")
    if args.save_latents:
        path = save_npy(latents_t.float().numpy(), args.save_latents)
        print(f"latents: {path} (float32 {list(latents_t.shape)}, standard normal units; decode with "
              f"difflab sample --run {args.run} --init-noise {path} --n {len(data)} --sampler ddim "
              f"--steps {args.steps}{'' if args.spacing == 'uniform' else ' --spacing ' + args.spacing})")
    return 0
