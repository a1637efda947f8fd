"""difflab train: every flag comes from difflab.config.TrainConfig."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from typing import Any

from difflab.config import add_config_arguments, flags_given, read_config_file

# the defaults that depend on the process (difflab.recipe.PROCESS_DEFAULTS), as --help shows them
SHOWN_DEFAULTS = {"prediction": "velocity with --process flow, else v",
                  "noise_sampling": "logit-normal with --process flow, else uniform",
                  "sampler": "dpmpp-2m-sde for unconditional flow runs, else dpmpp-2m"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p, defaults=SHOWN_DEFAULTS)
    p.add_argument("--config", metavar="FILE", help="a saved config.json (or part of one) as the defaults; the "
                   "flags given beside it win")
    p.add_argument("--resume", action="store_true",
                   help="continue the latest checkpoint in --out (a new run when there is none)")
    p.add_argument("--nproc", type=int, default=0,
                   help="launch N processes on this machine with torchrun (DDP; gloo on CPU, NCCL on GPU)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    if args.nproc and "WORLD_SIZE" not in os.environ:
        return _launch(args.nproc)
    from difflab.evaluate import during_training
    from difflab.recipe import build_config
    from difflab.training.trainer import Trainer

    given = given_settings(args)
    trainer = Trainer(build_config(given), resume=args.resume, given=given, progress=not args.quiet,
                      evaluation=during_training.plan)
    result = trainer.run()
    if trainer.dist.main:
        why = {"steps": "done", "time-limit": "time limit reached", "signal": "stopped by a signal"}[result.stopped_by]
        print(f"{why}: step {result.step} in {result.seconds / 60:.1f} min ({result.images_per_second:.0f} img/s)")
        print(f"checkpoint: {result.checkpoint}")
        if result.grid is not None:
            print(f"samples:    {result.grid}")
        print(f"loss curve: {trainer.out / 'loss.png'}")
    trainer.dist.shutdown()
    if result.signal == signal.SIGINT:
        return 130
    return 0


def given_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The settings the user gave: a ``--config`` file's keys, and the flags typed over them."""
    return {**(read_config_file(args.config) if args.config else {}), **flags_given(args)}


def _launch(n: int) -> int:
    """Re-run this command under torchrun's launcher with n processes (without --nproc)."""
    from difflab.runs.distributed import launch

    argv, skip = [], False
    for a in sys.argv[1:]:
        if skip:
            skip = False
            continue
        if a == "--nproc":
            skip = True
            continue
        if a.startswith("--nproc="):
            continue
        argv.append(a)
    return launch(n, argv)
