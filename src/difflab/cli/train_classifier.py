"""difflab train-classifier: a noisy, time-conditioned classifier for classifier guidance.

    difflab train-classifier --run runs/mnist --out runs/mnist-clf --time-limit 3
    difflab sample --run runs/mnist --classifier runs/mnist-clf --class 3 --classifier-scale 2 --out g.png

Its training flags are ``difflab train``'s (TrainConfig's fields), with the classifier defaults of
``recipe.METHOD_DEFAULTS``: the same flags give the config ``difflab train --method noisy-classifier`` gives.
"""

from __future__ import annotations

import argparse
import signal

from difflab.config import TrainConfig, add_config_arguments, flags_given
from difflab.methods.classification import NOISY_WIDTHS
from difflab.recipe import METHOD_DEFAULTS
from difflab.runs.classifier import KIND

# the TrainConfig fields this command takes as flags (--data is its own: the alternative to --run)
CONFIG_FLAGS = ("process", "T", "gamma", "image_size", "image_channels", "steps", "time_limit", "batch_size", "lr",
                "weight_decay", "warmup", "checkpoint_every", "seed", "device")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", default=None, help="diffusion run folder: train on its data and its Gaussian process")
    p.add_argument("--data", default=None, help="dataset name or folder (instead of --run; then --process, --T, "
                   "--gamma, --image-size and --image-channels should be the ones of the run it will guide)")
    p.add_argument("--out", required=True, help="classifier run folder to write (config.json, checkpoints/, "
                   "accuracy.json)")
    add_config_arguments(p, CONFIG_FLAGS, METHOD_DEFAULTS[KIND])
    p.add_argument("--channels", type=int, default=None, help="width of the first level, the others scaled as "
                   f"{NOISY_WIDTHS} (default: {NOISY_WIDTHS.split(',')[0]})")
    p.add_argument("--eval-n", type=int, default=2000, help="noisy test images per noise level (default 2000)")
    p.add_argument("--resume", action="store_true", help="continue the latest checkpoint in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def config_of(args: argparse.Namespace) -> TrainConfig:
    """The classifier run's config from the parsed flags."""
    from difflab.classifier_training import classifier_run_config

    return classifier_run_config(args.out, run=args.run, data=args.data, model_channels=args.channels,
                                 **flags_given(args, CONFIG_FLAGS))


def run(args: argparse.Namespace) -> int:
    from difflab.classifier_training import fit_classifier

    result = fit_classifier(config_of(args), eval_n=args.eval_n, resume=args.resume, progress=not args.quiet)
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
