"""The ``difflab`` command line: a thin layer that parses, calls the library and
turns known errors into one line on stderr with exit code 2.

Each sub-command lives in its own module of this package with two functions,
``add_arguments(parser)`` and ``run(args) -> int``; modules are imported only
when their command runs, so ``difflab --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# Idle OpenMP threads sleep instead of spinning. Read once, when torch loads OpenMP, so it is set before any
# command imports torch (an environment value the user set wins). With spinning, two threads on two cores
# that also run anything else train several times slower; on an idle machine sleeping costs nothing.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from difflab.errors import TrainingDiverged, UsageError

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("train", "train a diffusion model (Gaussian, naive or cold) on a dataset"),
    "distill": ("distill", "tune a trained run into a consistency model that draws in 1 or 2 steps (ECT)"),
    "sample": ("sample", "draw samples from a trained run (or a diffusers UNet) into a PNG grid / .npz"),
    "evaluate": ("evaluate", "FID, KID, precision/recall, accuracy and bits/dim of a run or a sample file"),
    "likelihood": ("likelihood", "bits per dimension of test images under a run (probability-flow ODE)"),
    "invert": ("invert", "DDIM-invert images to latents and reconstruct them"),
    "edit": ("edit", "SDEdit an image at a strength, or repaint a masked region (RePaint)"),
    "interpolate": ("interpolate", "slerp between two seeds or two images and write a strip"),
    "ema": ("ema", "build the post-hoc EMA of any relative length from a run's EMA snapshots (EDM2)"),
    "figures": ("figures", "the series' figures for a run: noising strips, trajectories, samples"),
    "train-classifier": ("train_classifier", "train a noisy, time-conditioned classifier for guidance"),
    "serve": ("serve", "the explorer: a local web page to sample, compare, noise, interpolate and invert"),
    "export": ("export", "write a run as a diffusers pipeline folder (Hub layout, model card)"),
    "pack": ("pack", "write a data set as .npy shards that training streams"),
}


class _Parser(argparse.ArgumentParser):
    """argparse that exits with 2 and one line (no usage dump) on bad flags."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"difflab: error: {message} (see '{self.prog} --help')\n")
        raise SystemExit(2)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = _Parser(prog="difflab", description="Diffusion models: train, sample, evaluate.")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if only is None or name == only:
            _module(module).add_arguments(p)
    return parser


def _module(name: str):
    return importlib.import_module(f"difflab.cli.{name}")


def _version() -> str:
    from difflab import __version__

    return f"difflab {__version__}"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(only=command if command in COMMANDS else "")
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(_module(COMMANDS[args.command][0]).run(args) or 0)
    except UsageError as e:
        sys.stderr.write(f"difflab {args.command}: error: {e}\n")
        return 2
    except TrainingDiverged as e:
        sys.stderr.write(f"difflab {args.command}: {e}\n")
        return 1
    except OSError as e:  # the environment (a file unreadable, a disk full) rather than a bug: one line
        where = f" ({e.filename})" if e.filename else ""
        sys.stderr.write(f"difflab {args.command}: error: {e.strerror or e}{where}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write(f"difflab {args.command}: interrupted\n")
        return 130
