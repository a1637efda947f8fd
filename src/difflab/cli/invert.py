"""difflab invert: DDIM-invert dataset images to latents, reconstruct them, report the error
(:meth:`difflab.model.Model.invert` and :meth:`~difflab.model.Model.decode`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from difflab.checks import MAX_SAMPLES, check_values
from difflab.cli.rundata import (
    add_run_images_arguments,
    check_one_model,
    default_split,
    gaussian_model,
    run_images,
    save_npy,
)
from difflab.errors import UsageError
from difflab.files import check_output
from difflab.samplers import SPACINGS


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_run_images_arguments(p, 8, "; images are fitted to the run's size and channels")
    p.add_argument("--steps", type=int, default=100, help="DDIM steps each way (default 100)")
    p.add_argument("--spacing", choices=SPACINGS, default="uniform",
                   help="noise-level grid (default uniform, the grid of 'difflab sample --sampler ddim')")
    p.add_argument("--refine", type=int, default=0, help="fixed-point iterations per inversion step "
                   "(0: plain DDIM inversion; more make the round trip exact on any grid, one call each)")
    p.add_argument("--out", default=None, help="PNG strip, originals above reconstructions "
                   "(default RUN/samples/invert.png; needed with --diffusers-model)")
    p.add_argument("--save-latents", default=None, help="write the latents as float32 [N, C, H, W] .npy in "
                   "standard-normal units, for 'difflab sample --init-noise FILE --sampler ddim' with the "
                   "same --steps")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward batch")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda")
    p.add_argument("--force", action="store_true", help="replace --out / --save-latents files that exist")


def run(args: argparse.Namespace) -> int:
    from difflab.figures import save_rows
    from difflab.latents import reconstruction_error
    from difflab.runs.data import pick_device

    check_values({"--n": (args.n, 1, MAX_SAMPLES), "--steps": (args.steps, 1, 100_000), "--refine": (args.refine, 0, 1000),
                  "--batch-size": (args.batch_size, 1, 1 << 16)})
    check_one_model(args)
    if args.out is None and args.run is None:
        raise UsageError("with --diffusers-model, name the strip with --out FILE.png")
    out = check_output(args.out or Path(args.run) / "samples" / "invert.png", "--out", force=args.force,
                       own=args.out is None)
    if args.save_latents:
        check_output(args.save_latents, "--save-latents", force=args.force)
    model = gaussian_model(args, pick_device(args.device), "invert")
    name = args.data or model.run.cfg.data
    data = run_images(name, args.split or default_split(name), model.shape, args.n)
    settings = dict(steps=args.steps, spacing=args.spacing, labels=model.image_labels(data.labels, data.class_names),
                    batch_size=args.batch_size)
    latents = model.invert(data.images, refine=args.refine, **settings)
    recon = model.decode(latents, **settings)
    mse, psnr = reconstruction_error(data.images, recon)
    print(f"reconstruction of {len(data)} images ({args.steps} DDIM steps each way): "
          f"MSE {mse:.3f}, PSNR {psnr:.2f} dB ([0, 255] units)")
    out = save_rows([data.images, recon], out)
    print(f"strip: {out} (originals above, reconstructions below)")
    if args.save_latents:
        path = save_npy(latents.float().numpy(), args.save_latents)
        # a diffusers folder samples on its scheduler's grid unless --spacing names difflab's
        source = f"--run {args.run}" if model.run is not None else f"--diffusers-model {args.diffusers_model}"
        spacing = "" if args.spacing == "uniform" and model.run is not None else f" --spacing {args.spacing}"
        # the inversion's own settings: the network alone (a run samples with its guidance and clipping)
        alone = " --clip none --guidance 1 --autoguidance 1" if model.run is not None else ""
        print(f"latents: {path} (float32 {list(latents.shape)}, standard normal units; decode with "
              f"difflab sample {source} --init-noise {path} --n {len(data)} --sampler ddim "
              f"--steps {args.steps}{spacing}{alone})")
    return 0
