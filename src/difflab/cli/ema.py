"""difflab ema: the post-hoc EMA of a relative length, built from a run's EMA snapshots (EDM2)."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, help="run folder written by 'difflab train' (with EMA snapshots)")
    p.add_argument("--ema-length", type=float, required=True,
                   help="relative length sigma_rel of the EMA to build, a fraction of the run (e.g. 0.08)")
    p.add_argument("--force", action="store_true", help="build it again when the run already holds it")


def run(args: argparse.Namespace) -> int:
    from difflab.config import load_run_config
    from difflab.ema_lengths import check_ema_length
    from difflab.runs.posthoc_ema import save_posthoc_ema

    check_ema_length(args.ema_length)
    load_run_config(args.run)  # a missing or foreign folder fails with its own message
    path, info = save_posthoc_ema(args.run, args.ema_length, force=args.force)
    print(f"ema: {path.with_suffix('.safetensors')} (sigma_rel {info['ema_length']}, gamma {info['gamma']:.3f}, "
          f"step {info['step']}, from {info['snapshots']} snapshots; profile fit error {info['profile_error']:.2%})")
    return 0
