"""difflab sample: draw samples from a run (or a diffusers UNet folder) into a PNG grid and/or .npz."""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from difflab.checks import check_values
from difflab.errors import UsageError
from difflab.files import atomic_write, check_output
from difflab.runs.request import SampleRequest, read_noise
from difflab.samplers import SPACINGS

GUIDANCE_HELP = ("classifier-free guidance scale g: f_hat = f(z, null) + g (f(z, c) - f(z, null)); "
                 "g = 1 + w with w the weight of Ho & Salimans; g = 1 is plain conditional sampling, "
                 "g = 0 unconditional")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from difflab.samplers import SAMPLERS

    p.add_argument("--run", help="run folder written by 'difflab train'")
    p.add_argument("--diffusers-model", help="a diffusers UNet2DModel folder or saved pipeline; samples follow its "
                   "scheduler config (spacing, offset, final alpha, clipping) unless --spacing is given")
    p.add_argument("--ema-length", type=float, default=None, help="sample the post-hoc power EMA of this "
                   "relative length (see 'difflab ema'; built now when the run has not saved it)")
    p.add_argument("--n", type=int, default=64, help="number of samples (default 64)")
    p.add_argument("--seed", type=int, default=0, help="seed; sample j depends only on (seed, j)")
    p.add_argument("--sampler", default=None, choices=sorted(SAMPLERS),
                   help="sampler (default: the run's --sampler; part 1 runs use their own)")
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default: the run's --sample-steps; naive2: 64)")
    p.add_argument("--clip", default=None, choices=["none", "clip", "dynamic"],
                   help="x0 estimates: clip to the data range, dynamic thresholding, or none (default: the run's --clip)")
    p.add_argument("--eta", type=float, default=None,
                   help="DDIM / DPM-Solver++ SDE eta (0 deterministic, 1 = DDPM's noise)")
    p.add_argument("--order", type=int, default=None, help="order of the dpmpp-* and unipc solvers (1 to 3)")
    p.add_argument("--lower-order-final", action=argparse.BooleanOptionalAction, default=None,
                   help="unipc: lower the order at the last steps as diffusers' UniPCMultistepScheduler does "
                        "(default off: 4x closer to the exact answer at 10 and 20 steps, bench/RESULTS.md)")
    p.add_argument("--variance", choices=["small", "large"], default=None, help="DDPM variance")
    p.add_argument("--spacing", choices=SPACINGS, default=None,
                   help="noise-level grid (default: the sampler's own)")
    p.add_argument("--sigma-min", type=float, default=None, help="bottom of the karras/geometric grids: the last "
                   "step denoises from this noise level (default: the run's --sample-sigma-min; 0: the process's own)")
    p.add_argument("--churn", type=float, default=None, help="EDM churn for euler/heun")
    p.add_argument("--class", dest="class_label", default=None,
                   help="class to sample: its name (as saved with the run) or its index")
    p.add_argument("--prompt", default=None, help="text prompt (runs trained with --conditioning text)")
    p.add_argument("--guidance", type=float, default=None, help=GUIDANCE_HELP + " (default: the run's --guidance "
                   "for class/text runs, 1 otherwise)")
    p.add_argument("--autoguidance", type=float, default=None, help="autoguidance scale w: D_guide + w (D - D_guide), "
                   "the guide being the run's EMA from early in training (default: the run's --autoguidance for "
                   "unconditional runs; 1: off)")
    p.add_argument("--guide-sigmas", type=float, nargs=2, metavar=("LO", "HI"), default=None,
                   help="guide (classifier-free and autoguidance) only at noise levels LO <= sigma <= HI, elsewhere one "
                   "unguided evaluation (default: the run's --guide-sigma-min/max: for unconditional runs every level above "
                   "the grid's bottom up to 20, 1 10 for class runs, every level for text runs; 0 inf: every level)")
    p.add_argument("--guidance-rescale", type=float, default=None, metavar="PHI", help="guidance rescale (Lin et "
                   "al. 2024): pull the guided x0's std towards the unguided one's, mixed by PHI in [0, 1] (default 0)")
    p.add_argument("--apg-eta", type=float, default=None, metavar="ETA", help="adaptive projected guidance (Sadat et "
                   "al. 2025): weight ETA in [0, 1] of the guidance update's part parallel to the conditional x0 "
                   "(0: the paper's; 1 with no threshold and no momentum: plain guidance; default: APG off)")
    p.add_argument("--apg-threshold", type=float, default=None, metavar="R", help="APG: cap the update's norm per "
                   "sample at R (default inf: no cap)")
    p.add_argument("--apg-momentum", type=float, default=None, metavar="BETA", help="APG: momentum of the update "
                   "over the steps, in (-1, 1) (the paper's is negative; default 0)")
    p.add_argument("--guide-keep-mean", action=argparse.BooleanOptionalAction, default=None, help="remove the "
                   "guidance update's mean over each image, per channel, so guidance keeps the unguided estimate's "
                   "colour balance (default: the run's; on for autoguidance of runs trained since it existed)")
    p.add_argument("--classifier", default=None, help="classifier run folder (difflab train-classifier) "
                   "for classifier guidance")
    p.add_argument("--classifier-scale", type=float, default=1.0, help="classifier guidance weight w")
    p.add_argument("--classifier-sigma-max", type=float, default=None,
                   help="guide only at noise levels sigma <= this (default 80; inf: every level)")
    p.add_argument("--cold-update", action=argparse.BooleanOptionalAction, default=None,
                   help="naive2: the cold-diffusion update (default: the run's)")
    p.add_argument("--told-noise", type=float, default=None, help="naive2: the fraction of the noise the network is "
                   "told of (default: the run's; 1: the truth)")
    p.add_argument("--init-noise", default=None, help=".npy float32 [N, C, H, W] starting noise")
    p.add_argument("--batch-size", type=int, default=256, help="samples per forward batch")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda")
    p.add_argument("--bf16", action="store_true", help="run the network with pure bf16 weights (fast on GPUs and on CPUs with AMX)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the network (GPUs: with CUDA graphs; CPUs: frozen weights, C++ wrapper)")
    p.add_argument("--out", default=None, help="PNG grid to write (default RUN/samples/sample-seedS.png)")
    p.add_argument("--save-npz", default=None, help="also write uint8 [N, H, W, C] under 'images' (+ 'labels')")
    p.add_argument("--nrow", type=int, default=None, help="images per row of the grid")
    p.add_argument("--out-dir", default=None, help="also write one PNG per sample, named by its seed index, "
                   "with the settings in its text chunk (what FID tools read)")
    p.add_argument("--force", action="store_true", help="replace --out / --save-npz files that exist, and let "
                   "--out-dir be a folder that holds other files")
    p.add_argument("--trajectory", default=None, help="GIF of the denoising path (x_t above the predicted x0)")


def request_from_args(args: argparse.Namespace) -> SampleRequest:
    """The flags as a :class:`~difflab.runs.request.SampleRequest` (checked; --init-noise read once --n is)."""
    same = ("seed", "sampler", "steps", "guidance", "autoguidance", "prompt", "clip", "eta", "order", "variance", "spacing", "churn",
            "lower_order_final",
            "sigma_min", "guide_sigmas", "guidance_rescale", "apg_eta", "apg_threshold", "apg_momentum", "guide_keep_mean",
            "cold_update", "told_noise",
            "classifier", "classifier_scale", "classifier_sigma_max", "batch_size")
    req = SampleRequest(run=args.run or args.diffusers_model, n=args.n, labels=_as_int(args.class_label),
                        precision="bf16" if args.bf16 else "fp32", **{k: getattr(args, k) for k in same})
    return replace(req, init_noise=read_noise(args.init_noise, req.n)) if args.init_noise else req


def run(args: argparse.Namespace) -> int:
    from difflab.runs.data import pick_device
    from difflab.runs.distributed import DistContext

    if (args.run is None) == (args.diffusers_model is None):
        raise UsageError("give exactly one of --run DIR or --diffusers-model DIR")
    check_values({"--nrow": (args.nrow, 1, 100_000)})
    req = request_from_args(args)
    out = _check_outputs(args)
    ctx = DistContext.from_env(pick_device(args.device).type)  # under torchrun: split the n samples
    from difflab.outputs import Trajectory, prepare_out_dir

    out_dir = prepare_out_dir(args.out_dir, args.force) if args.out_dir and ctx.main else None
    path_cb = Trajectory() if args.trajectory else None  # keeps whole batches (one batch per frame row)
    from difflab.runs.draw import drawing

    model = _load(args, pick_device(args.device, ctx.local_rank))
    if args.class_label is not None:
        req = replace(req, labels=class_index(args.class_label, model.class_names))
    d = drawing(model, req)  # resolved once: the run's defaults, the classes, the grid
    if args.compile and args.run:
        model.speed_up(compile=True)
    images = _draw(d, ctx, path_cb)
    ctx.shutdown()  # every rank holds all images now
    if ctx.main:  # only rank 0 writes
        _write(args, images, d.request.label_tensor(), out, out_dir, path_cb)
    return 0


def _as_int(value: str | None) -> int | None:
    try:
        return int(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def class_index(value: str, class_names: list[str] | None) -> int:
    """``--class``: a saved class name (exactly), else a class index (its range is checked with the request)."""
    if class_names and value in class_names:
        return class_names.index(value)
    if _as_int(value) is not None:
        return int(value)
    known = f"its classes: {', '.join(class_names[:20])}{', ...' if len(class_names) > 20 else ''}" if class_names \
        else "it saved no class names; give an index"
    raise UsageError(f"--class {value!r} is not a class of this run ({known})")


def _check_outputs(args: argparse.Namespace) -> str | None:
    """The grid's path (default RUN/samples/sample-seedS.png), every output checked before any work."""
    if args.out is None and args.save_npz is None and args.out_dir is None and args.run is None:
        raise UsageError("give --out GRID.png, --out-dir DIR and/or --save-npz FILE")
    own = args.out is None  # the default grid name under RUN/samples is difflab's own, replaced on purpose
    out = args.out or (str(Path(args.run) / "samples" / f"sample-seed{args.seed}.png") if args.run else None)
    for path, flag, mine in ((out, "--out", own), (args.save_npz, "--save-npz", False),
                             (args.trajectory, "--trajectory", False)):
        if path:
            check_output(path, flag, force=args.force, own=mine)
    return out


def _load(args: argparse.Namespace, device):
    if args.diffusers_model:
        from difflab.interop.folder_model import FolderModel

        return FolderModel.load(args.diffusers_model, device)
    from difflab.runs.draw import load_run

    return load_run(args.run, device, ema_length=args.ema_length)


def _draw(d, ctx, path_cb) -> torch.Tensor:
    """The images of a :class:`~difflab.runs.draw.Drawing` on every rank, with rank 0's progress bar over its share."""
    from tqdm.auto import tqdm

    from difflab.runs.distributed import shard
    from difflab.runs.draw import shard_block

    bar = None
    if ctx.main:
        bar = tqdm(total=len(shard(d.request.n, ctx, shard_block(d.model, d.request))), unit="img", unit_scale=True,
                   file=sys.stderr, mininterval=0.5, delay=0.5, dynamic_ncols=True)

    def tick(k: float) -> None:  # k images' worth of sampler steps (fractions: the bar moves every step)
        if bar is not None:
            bar.update(min(k, bar.total - bar.n))

    images = d.sharded(ctx, progress=tick, callback=path_cb)
    if bar is not None:
        bar.close()
    return images


def _write(args: argparse.Namespace, images: torch.Tensor, labels, out, out_dir, path_cb) -> None:
    from difflab.figures import save_grid
    from difflab.outputs import save_sample_pngs

    if out:
        save_grid(images, out, nrow=args.nrow)
        print(f"grid: {out}")
    if out_dir is not None:
        settings = {k: v for k, v in vars(args).items() if k not in ("out_dir", "force", "command") and v is not None}
        save_sample_pngs(images, out_dir, settings)
        print(f"samples: {out_dir}/000000.png .. {len(images) - 1:06d}.png")
    if path_cb is not None:
        print(f"trajectory: {path_cb.save(args.trajectory)}")
    if args.save_npz:
        arrays = {"images": images.permute(0, 2, 3, 1).numpy()}
        if labels is not None:
            arrays["labels"] = labels.numpy()
        path = atomic_write(args.save_npz, lambda tmp: _savez(tmp, arrays))
        print(f"samples: {path} ({len(images)} images, uint8 [N, H, W, C])")


def _savez(tmp: Path, arrays: dict) -> None:
    with open(tmp, "wb") as f:  # a file object: numpy would add .npz to a temporary name
        np.savez_compressed(f, **arrays)
