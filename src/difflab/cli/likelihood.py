"""difflab likelihood: bits per dimension of 8-bit images under a run, by the probability-flow ODE
(:meth:`difflab.model.Model.likelihood`)."""

from __future__ import annotations

import argparse
import math
import sys

from difflab.checks import MAX_SAMPLES, MAX_SEED, check_values
from difflab.cli.rundata import add_run_images_arguments, default_split, gaussian_model, run_images
from difflab.files import check_output


def add_arguments(p: argparse.ArgumentParser) -> None:
    from difflab.likelihood import PROBES

    add_run_images_arguments(p, 256)
    p.add_argument("--steps", type=int, default=32, help="RK4 steps in log sigma (4 network calls each; "
                   "default 32)")
    p.add_argument("--hutchinson-samples", type=int, default=1, help="probe vectors of the trace estimator "
                   "per image (default 1)")
    p.add_argument("--probe", choices=PROBES, default="rademacher", help="Hutchinson probe distribution")
    p.add_argument("--seed", type=int, default=0, help="seed of the dequantisation noise and the probes")
    p.add_argument("--batch-size", type=int, default=64, help="images per batch")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda")
    p.add_argument("--json", default=None, help="also write the result as JSON to this file")
    p.add_argument("--force", action="store_true", help="replace a --json file that exists")


def run(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from difflab.config import save_json
    from difflab.runs.data import pick_device

    check_values({"--n": (args.n, 1, MAX_SAMPLES), "--steps": (args.steps, 1, 100_000),
                  "--hutchinson-samples": (args.hutchinson_samples, 1, 10_000), "--seed": (args.seed, 0, MAX_SEED),
                  "--batch-size": (args.batch_size, 1, 1 << 16)})
    if args.json:
        check_output(args.json, "--json", force=args.force)
    model = gaussian_model(args, pick_device(args.device), "likelihood")
    data_name = args.data or model.run.cfg.data
    split = args.split or default_split(data_name)
    data = run_images(data_name, split, model.shape, args.n)
    bar = None

    def progress(done: int) -> None:
        nonlocal bar
        if bar is None:  # drawn once the model has checked the images and their condition
            bar = tqdm(total=len(data), unit="img", file=sys.stderr, mininterval=0.5, dynamic_ncols=True)
        bar.update(done)

    bpd = model.likelihood(data.images, steps=args.steps, seed=args.seed, hutchinson_samples=args.hutchinson_samples,
                           probe=args.probe, labels=model.image_labels(data.labels, data.class_names),
                           batch_size=args.batch_size, progress=progress)
    if bar is not None:
        bar.close()
    mean = float(bpd.mean())
    stderr = float(bpd.std() / math.sqrt(len(bpd))) if len(bpd) > 1 else float("nan")
    print(f"bits/dim: {mean:.4f} +- {stderr:.4f} (mean +- standard error over {len(bpd)} images of "
          f"{data_name}; 8-bit data, uniform dequantisation; probability-flow ODE, RK4, {args.steps} steps, "
          f"{args.hutchinson_samples} {args.probe} probe(s))")
    if args.json:
        save_json(args.json, {
            "bits_per_dim": mean, "standard_error": stderr, "n": len(bpd),
            **({"run": str(args.run), "step": model.run.step} if model.run is not None else
               {"diffusers_model": str(args.diffusers_model)}), "data": data_name, "split": split, "ode_steps": args.steps,
            "solver": "rk4-log-sigma", "hutchinson_samples": args.hutchinson_samples, "probe": args.probe,
            "seed": args.seed, "per_image": [float(b) for b in bpd],
        })
        print(f"json: {args.json}")
    return 0
