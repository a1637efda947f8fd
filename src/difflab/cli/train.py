"""difflab train: every flag comes from difflab.config.TrainConfig."""

from __future__ import annotations

import argparse
import os
import signal
import sys

from difflab.config import add_config_arguments, config_from_args, read_config_file


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p)
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
    from difflab.training.trainer import Trainer

    cfg = config_from_args(args, defaults=read_config_file(args.config) if args.config else None)
    trainer = Trainer(cfg, resume=args.resume, progress=not args.quiet, evaluation=during_training.plan)
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
