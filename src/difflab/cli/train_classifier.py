"""difflab train-classifier: a noisy, time-conditioned classifier for classifier guidance.

    difflab train-classifier --run runs/mnist --out runs/mnist-clf --time-limit 3
    difflab sample --run runs/mnist --classifier runs/mnist-clf --class 3 --classifier-scale 2 --out g.png
"""

from __future__ import annotations

import argparse
import signal

from difflab.config import PROCESSES
from difflab.errors import UsageError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", default=None, help="diffusion run folder: train on its data and its Gaussian process")
    p.add_argument("--data", default=None, help="dataset name or folder (instead of --run)")
    p.add_argument("--process", default="linear", choices=PROCESSES, help="with --data: the noise process "
                   "(default linear; use the one of the diffusion run the classifier will guide)")
    p.add_argument("--T", type=int, default=1000, help="with --data: discrete steps (default 1000)")
    p.add_argument("--gamma", type=float, default=0.9, help="with --data: gamma of the constant schedule")
    p.add_argument("--image-size", type=int, default=0, help="with --data: resize images (0: as the trainer does)")
    p.add_argument("--image-channels", type=int, default=0, help="with --data: 1 or 3 channels (0: the dataset's)")
    p.add_argument("--out", required=True, help="classifier run folder to write (config.json, checkpoints/, "
                   "accuracy.json)")
    p.add_argument("--steps", type=int, default=2000, help="optimiser steps (default 2000)")
    p.add_argument("--time-limit", type=float, default=0.0, help="stop, save and evaluate after this many minutes")
    p.add_argument("--batch-size", type=int, default=128, help="batch size (default 128)")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default 1e-3)")
    p.add_argument("--channels", type=int, default=32, help="width of the first level (default 32)")
    p.add_argument("--eval-n", type=int, default=2000, help="noisy test images per noise level (default 2000)")
    p.add_argument("--seed", type=int, default=0, help="seed (data order, noise, initial weights)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda")
    p.add_argument("--resume", action="store_true", help="continue the latest checkpoint in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from difflab.classifier_training import train_classifier_run

    if args.run is not None and args.data is not None:
        raise UsageError("give exactly one of --run DIFFUSION_RUN_DIR or --data NAME")
    result = train_classifier_run(
        args.out, run=args.run, data=args.data, process=args.process, T=args.T, gamma=args.gamma,
        image_size=args.image_size, image_channels=args.image_channels, steps=args.steps,
        time_limit=args.time_limit, batch_size=args.batch_size, lr=args.lr, model_channels=args.channels,
        seed=args.seed, device=args.device, eval_n=args.eval_n, resume=args.resume, progress=not args.quiet)
    why = {"steps": "done", "time-limit": "time limit reached", "signal": "stopped by a signal"}[result.stopped_by]
    print(f"{why}: step {result.step} in {result.seconds / 60:.1f} min")
    if result.stopped_by == "signal":
        print(f"checkpoint: {result.checkpoint}")
        return 130 if result.signal == signal.SIGINT else 0
    print("test accuracy on noisy images (sigma = sigmabar/gammabar, the noise-to-signal ratio):")
    print("  sigma      t   accuracy")
    for row in result.accuracy:
        print(f"  {row['sigma']:5.2f}  {row['t']:7.3f}   {row['accuracy']:.4f}")
    print(f"checkpoint: {result.checkpoint}")
    return 0
