"""difflab sample: draw samples from a run (or a diffusers UNet folder) into a PNG grid and/or .npz."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from difflab.checks import MAX_SAMPLES, MAX_SEED, check_array, check_values
from difflab.errors import UsageError
from difflab.files import atomic_write, check_output

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
    p.add_argument("--variance", choices=["small", "large"], default=None, help="DDPM variance")
    p.add_argument("--spacing", choices=["uniform", "karras", "geometric"], default=None,
                   help="noise-level grid (default: the sampler's own)")
    p.add_argument("--churn", type=float, default=None, help="EDM churn for euler/heun")
    p.add_argument("--class", dest="class_label", type=int, default=None, help="class index to sample")
    p.add_argument("--prompt", default=None, help="text prompt (runs trained with --conditioning text)")
    p.add_argument("--guidance", type=float, default=None, help=GUIDANCE_HELP + " (default: the run's --guidance "
                   "for class/text runs, 1 otherwise)")
    p.add_argument("--classifier", default=None, help="classifier run folder (difflab train-classifier) "
                   "for classifier guidance")
    p.add_argument("--classifier-scale", type=float, default=1.0, help="classifier guidance weight w")
    p.add_argument("--classifier-sigma-max", type=float, default=None,
                   help="guide only at noise levels sigma <= this (default 80; inf: every level)")
    p.add_argument("--cold-update", action="store_true", help="naive2: the cold-diffusion update")
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


def _options(args) -> dict:
    opts = {}
    for name in ("eta", "order", "variance", "spacing", "churn"):
        v = getattr(args, name)
        if v is not None:
            opts[name] = v
    return opts


def run(args: argparse.Namespace) -> int:
    from difflab.figures import save_grid
    from difflab.runs import pick_device
    from difflab.train.distributed import DistContext, sample_sharded, shard

    if (args.run is None) == (args.diffusers_model is None):
        raise UsageError("give exactly one of --run DIR or --diffusers-model DIR")
    check_values({"--n": (args.n, 1, MAX_SAMPLES), "--batch-size": (args.batch_size, 1, 1 << 16),
                  "--seed": (args.seed, 0, MAX_SEED), "--steps": (args.steps, 1, 100_000),
                  "--eta": (args.eta, 0, 1), "--churn": (args.churn, 0, None), "--guidance": (args.guidance, None, None),
                  "--classifier-scale": (args.classifier_scale, None, None), "--nrow": (args.nrow, 1, 100_000),
                  "--classifier-sigma-max": (args.classifier_sigma_max, 0, None, {"open_lo": True, "allow_inf": True})})
    if args.out is None and args.save_npz is None and args.out_dir is None and args.run is None:
        raise UsageError("give --out GRID.png, --out-dir DIR and/or --save-npz FILE")
    own = args.out is None  # the default grid name under RUN/samples is difflab's own, replaced on purpose
    out_path = args.out or (str(Path(args.run) / "samples" / f"sample-seed{args.seed}.png") if args.run else None)
    if out_path:
        check_output(out_path, "--out", force=args.force, own=own)
    if args.save_npz:
        check_output(args.save_npz, "--save-npz", force=args.force)
    if args.trajectory:
        check_output(args.trajectory, "--trajectory", force=args.force)
    ctx = DistContext.from_env(pick_device(args.device).type)  # under torchrun: split the n samples
    device = pick_device(args.device, ctx.local_rank)
    init_noise = _read_noise(args.init_noise, args.n) if args.init_noise else None
    from difflab.outputs import Trajectory, prepare_out_dir, save_sample_pngs

    out_dir = prepare_out_dir(args.out_dir, args.force) if args.out_dir and ctx.main else None
    path_cb = Trajectory() if args.trajectory else None  # keeps whole batches (one batch per frame row)
    from tqdm.auto import tqdm

    bar = None  # rank 0's progress over its share, created once the inputs are known to be good

    def tick(k: float) -> None:  # k images' worth of sampler steps (fractions: the bar moves every step)
        if bar is not None:
            bar.update(min(k, bar.total - bar.n))

    labels = None
    if args.diffusers_model:
        from difflab.figures import to_uint8
        from difflab.interop import load_diffusers_unet, sample_folder

        den, shape = load_diffusers_unet(args.diffusers_model, device)
        _check_noise_shape(init_noise, shape)
        block = 1

        def draw(start: int, count: int) -> torch.Tensor:
            x = sample_folder(den, count, shape, seed=args.seed, sampler=args.sampler or "ddim",
                              steps=args.steps or 50, batch_size=args.batch_size, device=device, start=start,
                              init_noise=_rows(init_noise, start, count), label=args.class_label, progress=tick,
                              callback=path_cb if start == 0 else None, **_options(args))
            return to_uint8(x)

        out = args.out
    else:
        from difflab.sampling import load_run

        run_ = load_run(args.run, device, ema_length=args.ema_length)
        _check_noise_shape(init_noise, run_.shape)
        run_.speed_up(bf16=args.bf16, compile=args.compile)
        classifier = None
        if args.classifier:
            from difflab.classifier_guidance import load_classifier

            classifier = load_classifier(args.classifier, device)
        _check_condition(args, run_)
        if args.class_label is not None:
            labels = torch.full((args.n,), args.class_label, dtype=torch.long)
        elif run_.conditioner.kind == "class" and args.prompt is None:
            labels = torch.arange(args.n) % run_.conditioner.num_classes
        default_steps = run_.cfg.sample_steps  # the run's own (naive2: 64 denoise-renoise steps)
        extra = {"cold_update": True} if args.cold_update else {}
        if args.guidance is not None:  # else the run's own scale (conditional runs)
            extra["guidance"] = args.guidance
        per_sample = run_.method.per_sample_seeds  # part-1 methods seed per batch: shard on batch ends
        block = 1 if per_sample else args.batch_size

        def draw(start: int, count: int) -> torch.Tensor:
            imgs = run_.sample(count, seed=args.seed, start=start, steps=args.steps or default_steps,
                               sampler=args.sampler or run_.cfg.sampler,
                               clip=args.clip or run_.cfg.clip,
                               batch_size=args.batch_size,
                               labels=_rows(labels, start, count), prompt=args.prompt,
                               init_noise=_rows(init_noise, start, count), classifier=classifier,
                               classifier_scale=args.classifier_scale,
                               classifier_sigma_max=args.classifier_sigma_max, progress=tick,
                               callback=path_cb if start == 0 else None, **_options(args), **extra)
            if not per_sample:
                tick(count)
            return imgs

        out = out_path
    if ctx.main:
        bar = tqdm(total=len(shard(args.n, ctx, block)), unit="img", unit_scale=True, file=sys.stderr,
                   mininterval=0.5, delay=0.5,
                   dynamic_ncols=True)
    images = sample_sharded(draw, args.n, ctx, block)
    if bar is not None:
        bar.close()
    ctx.shutdown()  # every rank holds all images now
    if not ctx.main:  # only rank 0 writes
        return 0
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
    return 0


def _savez(tmp: Path, arrays: dict) -> None:
    with open(tmp, "wb") as f:  # a file object: numpy would add .npz to a temporary name
        np.savez_compressed(f, **arrays)


def _rows(x: torch.Tensor | None, start: int, count: int) -> torch.Tensor | None:
    """Rows start..start+count of a per-sample tensor (labels, starting noise), or None."""
    return None if x is None else x[start : start + count]


def _check_condition(args, run_) -> None:
    """Condition flags that cannot work with this run fail before any sampling starts."""
    kind, k = run_.conditioner.kind, run_.conditioner.num_classes
    if args.class_label is not None and kind in ("class", "text") and not 0 <= args.class_label < k:
        raise UsageError(f"--class must be in 0..{k - 1} for this run, got {args.class_label}")
    if args.prompt is not None and kind != "text":
        raise UsageError("--prompt needs a run trained with --conditioning text")
    if args.guidance is not None and args.guidance != 1.0 and kind == "none":
        raise UsageError("--guidance needs a run trained with --conditioning class|text (for an unconditional "
                         "run use --classifier with --classifier-scale)")
    if args.class_label is not None and kind == "none" and not args.classifier:
        raise UsageError("this run is unconditional: --class needs --classifier (classifier guidance)")


def _read_noise(path: str, n: int) -> torch.Tensor:
    p = Path(path)
    if not p.exists():
        raise UsageError(f"--init-noise file {path} does not exist")
    try:
        arr = np.load(p, allow_pickle=False)
    except ValueError as e:
        raise UsageError(f"--init-noise {path} is not a plain .npy array ({e})") from e
    except (OSError, EOFError) as e:
        raise UsageError(f"--init-noise {path} cannot be read ({e.__class__.__name__})") from e
    if not isinstance(arr, np.ndarray) or arr.ndim != 4 or arr.shape[0] < n:
        raise UsageError(f"--init-noise must be float32 [N, C, H, W] with N >= --n ({n}); got shape "
                         f"{getattr(arr, 'shape', '?')}")
    check_array(f"--init-noise {path}", arr[:n], kinds="f", ndim=4)
    return torch.from_numpy(np.ascontiguousarray(arr[:n], dtype=np.float32))


def _check_noise_shape(noise: torch.Tensor | None, shape: tuple[int, ...]) -> None:
    if noise is not None and tuple(noise.shape[1:]) != tuple(shape):
        raise UsageError(f"--init-noise has images of shape {list(noise.shape[1:])}; this model draws {list(shape)}")
