"""What the commands that work on a trained run and real images share: their flags, the model (a
Gaussian run or a diffusers UNet2DModel folder, as a :class:`~difflab.model.Model`), the images fitted to it,
and atomic .npy output."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from difflab.errors import UsageError


def add_run_images_arguments(p: argparse.ArgumentParser, n_default: int, fitted: str = "") -> None:
    """--run or --diffusers-model, --data, --split and --n: the first n images of a dataset or folder."""
    p.add_argument("--run", default=None, help="run folder written by 'difflab train' (a Gaussian run)")
    add_diffusers_argument(p)
    p.add_argument("--data", default=None, help="mnist, fashion-mnist, digits, emoji or a folder of images "
                   f"(default: the run's dataset; needed with --diffusers-model){fitted}")
    p.add_argument("--split", default=None, help="train or test (default: test for named datasets, "
                   "the whole folder for a folder)")
    p.add_argument("--n", type=int, default=n_default,
                   help=f"number of images, the first n of the split (default {n_default})")


def add_diffusers_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--diffusers-model", default=None, help="a diffusers UNet2DModel folder or saved pipeline "
                   "(its scheduler config's schedule and prediction type), instead of --run")


def check_one_model(args: argparse.Namespace) -> None:
    if (args.run is None) == (args.diffusers_model is None):
        raise UsageError("give exactly one of --run DIR or --diffusers-model DIR")


def gaussian_model(args: argparse.Namespace, device: torch.device, command: str):
    """The :class:`~difflab.model.Model` of exactly one of ``--run`` (a Gaussian run) and ``--diffusers-model``
    (whose images must be named with ``--data``)."""
    from difflab.model import Model

    check_one_model(args)
    if args.diffusers_model is None:
        return Model(gaussian_run(args.run, device, command))
    if args.data is None:
        raise UsageError("with --diffusers-model, name the images with --data")
    from difflab.interop.folder_model import FolderModel

    return Model(FolderModel.load(args.diffusers_model, device))


def gaussian_run(path: str, device: torch.device, command: str):
    """The run at ``path``, which must be a Gaussian-diffusion run (the others have no ODE)."""
    from difflab.runs.draw import load_run

    loaded_run = load_run(path, device)
    if not loaded_run.method.denoises:
        raise UsageError(f"difflab {command} needs a Gaussian run (--method gaussian); {path} is a "
                         f"{loaded_run.cfg.method} run")
    return loaded_run


def default_split(data: str) -> str:
    """test for a named dataset, train (the whole folder unless it has train/ and test/) for a folder."""
    from difflab.data import dataset_key

    return "test" if dataset_key(data) else "train"


def run_images(data: str, split: str, shape: tuple[int, int, int], n: int):
    """The first ``n`` images of a dataset or folder as an ImageData fitted to a run's (C, H, W):
    MNIST-sized 28x28 sets are padded to 32 as in training, other sizes resized."""
    from difflab.runs.data import load_fitted

    if n < 1:
        raise UsageError(f"--n must be at least 1, got {n}")
    return load_fitted(data, split, shape).subset(n)


def save_npy(array: np.ndarray, path: str | Path) -> Path:
    """Write ``array`` to ``path`` through a temporary file (never half-written)."""
    from difflab.files import atomic_write

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.save(f, array)

    return atomic_write(path, write)
