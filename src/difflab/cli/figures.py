"""difflab figures: the pictures a reader of the series wants to see for a trained run.

- ``noising.png``: the forward process z_0 .. z_T for a few dataset images, one row each (the binomial
  chain for naive1, pixel noise for naive2, the degradation for cold, the Gaussian marginals);
- ``prediction-from-noise.png``: z_T (top row) and what the network makes of it in one step, x_hat =
  f(z_T, T) (bottom row), one column per seed; and ``mean-image.png``: the mean training image beside
  the average x_hat over 64 seeds: predicting x from pure noise collapses to the mean (not naive1,
  whose network predicts z_{T-1});
- ``samples.png``: a grid of samples, drawn as ``difflab sample`` draws them (the run's sampler and settings);
- ``trajectory.png``: sampling step by step, two rows per image: the network's input z_t and its
  x_hat (naive2, cold; naive2 also ``trajectory-cold-update.png``); naive1: one row z_T .. z_0;
  Gaussian runs: ``trajectory-ddpm.png`` and ``trajectory-ddim.png`` (z_t and the x0 predictions).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

from difflab.checks import MAX_SEED, check_values
from difflab.errors import UsageError
from difflab.files import run_folder_of

MEAN_SEEDS = 64  # seeds averaged for the mean prediction from pure noise
FIGURES = ("noising.png", "prediction-from-noise.png", "mean-image.png", "samples.png", "trajectory*.png")


def check_figures_folder(out: Path, force: bool) -> None:
    """A user's ``--out`` folder: outside every run's own files, and no figure of an earlier call (or
    anyone's file of such a name) replaced without ``--force``."""
    if run_folder_of(out.resolve()) or out.is_file():
        raise UsageError(f"--out {out} must be a folder outside any run's own files (default RUN/figures)")
    found = sorted(p.name for pattern in FIGURES for p in out.glob(pattern)) if out.is_dir() else []
    if found and not force:
        raise UsageError(f"--out {out} already holds {', '.join(found)}; pass --force to replace them, "
                         f"or choose another folder")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, help="run folder written by 'difflab train'")
    p.add_argument("--out", default=None, help="folder for the PNGs (default RUN/figures)")
    p.add_argument("--n", type=int, default=6, help="images (rows) in the strips and trajectories (default 6)")
    p.add_argument("--columns", type=int, default=11, help="steps shown per strip (default 11)")
    p.add_argument("--grid", type=int, default=64, help="samples in samples.png (default 64)")
    p.add_argument("--steps", type=int, default=None,
                   help="sampling steps (default: the run's --sample-steps; naive1 always walks its T steps)")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise, the samples and the trajectories")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda")
    p.add_argument("--force", action="store_true", help="replace figures already in --out")


class _InputRecorder(nn.Module):
    """Wraps a network and keeps the input of every call: the z_t it was asked to denoise."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.inputs: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        self.inputs.append(x.detach().float().cpu())
        return self.net(x, t, **cond)


def columns_of(count: int, columns: int) -> list[int]:
    """At most ``columns`` evenly spaced indices of 0..count-1, first and last included."""
    return torch.linspace(0, count - 1, min(columns, count)).round().long().unique().tolist()


def noising_chain(run, x: torch.Tensor, columns: int, generator: torch.Generator) -> torch.Tensor:
    """The forward process of ``run`` on clean images x ([B, C, H, W] in [-1, 1]): [K, B, C, H, W], z_0 first."""
    chain = run.method.noising_chain(x, columns, generator)
    return chain[columns_of(len(chain), columns)]


def sampling_run(run, n: int, *, seed: int, steps: int | None, **settings):
    """Sample n images as ``difflab sample`` does with these settings (the run's own for the others), recording
    each step: (samples uint8, network inputs [S, n, ...], x_hats [S, n, ...])."""
    from difflab.runs.draw import drawing
    from difflab.runs.request import SampleRequest

    recorder = _InputRecorder(run.net)
    x0s: list[torch.Tensor] = []

    def keep(d: dict) -> None:
        x0s.append(d["x0"].detach().float().cpu())

    images = drawing(run, SampleRequest.of(n=n, seed=seed, steps=steps, **settings)).images(callback=keep, net=recorder)
    # (classifier-free guidance calls the network on the conditional inputs and the null ones side by side, and
    # outside its interval on the conditional ones alone)
    return images, torch.stack([x[:n] for x in recorder.inputs]), torch.stack(x0s)


def _rows(stacks: list[torch.Tensor], columns: int) -> list[torch.Tensor]:
    """Interleave per-image rows: for image b, stacks[0][cols, b], stacks[1][cols, b], ..."""
    cols = columns_of(len(stacks[0]), columns)
    return [s[cols, b] for b in range(stacks[0].shape[1]) for s in stacks]


def check_counts(n: int, grid: int, columns: int) -> None:
    """UsageError unless --n and --grid are at least 1 and --columns at least 2."""
    if n < 1 or grid < 1 or columns < 2:
        raise UsageError(f"--n and --grid must be at least 1 and --columns at least 2, got {n}, {grid}, {columns}")


def make_figures(run, out: Path, *, n: int = 6, columns: int = 11, grid: int = 64, steps: int | None = None,
                 seed: int = 0, log=print) -> list[Path]:
    """Write the figures of ``run`` (a :class:`difflab.runs.draw.Run`) into ``out``; returns the paths."""
    from difflab.data import to_model
    from difflab.figures import save_grid, save_rows
    from difflab.model import Model
    from difflab.runs.data import load_data

    check_counts(n, grid, columns)
    method = run.method
    data = load_data(run.cfg)
    scale = max(2, 64 // run.shape[-1])  # about 64 pixels per image, whatever the image size
    paths: list[Path] = []

    def emit(path: Path) -> None:
        paths.append(path)
        log(str(path))

    x = to_model(data.images[:n])
    chain = noising_chain(run, x, columns, torch.Generator().manual_seed(seed))
    emit(save_rows(list(chain.transpose(0, 1)), out / "noising.png", scale=scale))

    if not method.predicts_previous_step:  # (a prediction of z_{t-1} is no image estimate)
        one_step = {"sampler": "ddim"} if "ddim" in method.samplers else {}  # DDIM's one step starts at pure noise
        _, inputs, x0s = sampling_run(run, max(MEAN_SEEDS, n), seed=seed, steps=1, **one_step)
        emit(save_rows([inputs[0, :n], x0s[0, :n]], out / "prediction-from-noise.png", scale=scale))
        data_mean = to_model(data.images.sum(0, dtype=torch.float64).float() / len(data.images))
        means = torch.stack([data_mean, x0s[0, :MEAN_SEEDS].mean(0)])
        emit(save_grid(means, out / "mean-image.png", nrow=2, scale=scale))

    emit(save_grid(Model(run).sample(grid, seed=seed, steps=steps), out / "samples.png", nrow=min(grid, 8),
                   scale=scale))

    for suffix, options in method.trajectories().items():
        _, inputs, x0s = sampling_run(run, n, seed=seed, steps=steps, **options)
        # a chain of previous-step predictions is the trajectory itself: z_T, z_{T-1}, ..., z_0
        states = [torch.cat([inputs[:1], x0s])] if method.predicts_previous_step else [inputs, x0s]
        emit(save_rows(_rows(states, columns), out / f"trajectory{suffix}.png", scale=scale))
    return paths


def run(args: argparse.Namespace) -> int:
    from difflab.runs.data import pick_device
    from difflab.runs.draw import load_run

    check_counts(args.n, args.grid, args.columns)  # before the (slow) loading of the run
    check_values({"--n": (args.n, 1, 10_000), "--grid": (args.grid, 1, 10_000), "--columns": (args.columns, 1, 10_000),
                  "--steps": (args.steps, 1, 100_000), "--seed": (args.seed, 0, MAX_SEED)})
    if args.out:  # the run's own figures folder is rewritten on purpose
        check_figures_folder(Path(args.out), args.force)
    loaded_run = load_run(args.run, pick_device(args.device))
    out = Path(args.out) if args.out else Path(args.run) / "figures"
    make_figures(loaded_run, out, n=args.n, columns=args.columns, grid=args.grid, steps=args.steps, seed=args.seed)
    return 0
