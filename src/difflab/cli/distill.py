"""difflab distill: consistency tuning of a trained run (:mod:`difflab.distill`)."""

from __future__ import annotations

import argparse
import signal

from difflab.methods.consistency import SIGMA_MID, Tuning


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, help="the trained (unconditional, Gaussian) run to start from")
    p.add_argument("--out", required=True, help="the tuned run's folder (new, or the one to --resume)")
    p.add_argument("--time-limit", type=float, default=None, metavar="MIN", help="stop after this many minutes")
    p.add_argument("--steps", type=int, default=None, help="optimiser steps (default 10000, or to --time-limit)")
    p.add_argument("--resume", action="store_true", help="continue the tuned run in --out")
    p.add_argument("--lr", type=float, default=None, help="Adam learning rate (default: a tenth of the run's)")
    p.add_argument("--batch-size", type=int, default=None, help="batch size (default: the run's)")
    p.add_argument("--sample-steps", type=int, default=2, choices=(1, 2), help="steps the tuned run draws with")
    p.add_argument("--sigma-mid", type=float, default=SIGMA_MID,
                   help=f"the noise level of the second step (VE units; default {SIGMA_MID})")
    p.add_argument("--dropout", type=float, default=None,
                   help="dropout in the network's residual blocks while tuning (default: the run's, or 0.1 where it had none)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default=None, help="default: the run's")
    p.add_argument("--device", default=None, help="auto, cpu, cuda or cuda:N (default: the run's)")
    d = Tuning()
    p.add_argument("--stage-steps", type=int, default=d.stage_steps,
                   help=f"steps per ECT stage: each divides the gap t - r by --q (default {d.stage_steps})")
    p.add_argument("--q", type=float, default=d.q, help=f"ECT's gap divisor per stage (default {d.q:g})")
    p.add_argument("--p-mean", type=float, default=d.p_mean, help=f"mean of log t (default {d.p_mean})")
    p.add_argument("--p-std", type=float, default=d.p_std, help=f"std of log t (default {d.p_std})")
    p.add_argument("--huber-c", type=float, default=d.huber_c,
                   help=f"pseudo-Huber c per sqrt(pixel) (default {d.huber_c}: the L2 distance)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from difflab.distill import distill

    tuning = Tuning(p_mean=args.p_mean, p_std=args.p_std, q=args.q, stage_steps=args.stage_steps, huber_c=args.huber_c)
    result = distill(args.run, args.out, steps=args.steps, time_limit=args.time_limit, resume=args.resume,
                     tuning=tuning, lr=args.lr, batch_size=args.batch_size, sample_steps=args.sample_steps,
                     sigma_mid=args.sigma_mid, dropout=args.dropout, precision=args.precision, device=args.device,
                     progress=not args.quiet)
    why = {"steps": "done", "time-limit": "time limit reached", "signal": "stopped by a signal"}[result.stopped_by]
    print(f"{why}: step {result.step} in {result.seconds / 60:.1f} min ({result.images_per_second:.0f} img/s)")
    print(f"checkpoint: {result.checkpoint}")
    if result.grid is not None:
        print(f"samples:    {result.grid}")
    return 130 if result.signal == signal.SIGINT else 0
