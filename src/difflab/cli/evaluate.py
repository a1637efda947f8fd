"""difflab evaluate: FID, KID, precision/recall, accuracy of conditional samples and bits/dim.

Samples come from a run or a diffusers UNet2DModel folder (drawn here, sharded over ranks under
torchrun; a folder samples on its scheduler's own grid, as ``difflab sample`` does) or from an .npz
written by ``difflab sample --save-npz``; the reference is the run's dataset (its test split
when it has one) as the run trained on it (size, crop, padding, channels: ``runs.load_as_trained``).
Whatever the metrics need and is missing is one line before any sample is drawn. Prints a table and
writes every number under its plain name with --json.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch

from difflab.checks import MAX_SAMPLES, MAX_SEED, check_array, check_values
from difflab.errors import UsageError
from difflab.files import check_output, write_text


def add_arguments(p: argparse.ArgumentParser) -> None:
    from difflab.cli.rundata import add_diffusers_argument
    from difflab.samplers import SAMPLERS

    p.add_argument("--run", help="run folder (samples are drawn from its EMA weights)")
    add_diffusers_argument(p)
    p.add_argument("--samples", help=".npz with uint8 'images' [N, H, W, C] (and 'labels'), or a folder "
                   "of PNGs (difflab sample --out-dir), instead of --run")
    p.add_argument("--data", default=None, help="reference dataset (default: the run's)")
    p.add_argument("--split", default="test", help="reference split (default test; train if there is none)")
    p.add_argument("--n", type=int, default=1000, help="samples to draw (default 1000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sampler", default=None, choices=sorted(SAMPLERS), help="default: the run's --sampler (a diffusers folder: ddim)")
    p.add_argument("--steps", type=int, default=None, help="default: the run's --sample-steps (a diffusers folder: 50)")
    p.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale g (1: none; default: the run's for class/text runs)")
    p.add_argument("--autoguidance", type=float, default=None,
                   help="autoguidance scale w (1: none; default: the run's for unconditional runs)")
    p.add_argument("--metrics", default="fid,kid,precision,recall,accuracy",
                   help="comma-separated: fid, kid, precision, recall, accuracy, colour (saturation, brightness "
                   "and hue sixths against the reference's: difflab.evaluate.colour)")
    p.add_argument("--features", choices=["inception", "classifier"], default="inception",
                   help="inception (2048-d, comparable to papers) or classifier (fast on CPU, difflab-only)")
    p.add_argument("--inception-precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="auto: bf16 on CPUs that compute it natively (AVX-512 BF16, AMX), else fp32 (as published)")
    p.add_argument("--bpd", action="store_true", help="also bits/dim of reference images (probability-flow ODE)")
    p.add_argument("--bpd-n", type=int, default=64, help="images for --bpd (default 64)")
    p.add_argument("--json", default=None, help="write the results to this JSON file")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="auto")
    p.add_argument("--force", action="store_true", help="replace a --json file that exists")


def run(args: argparse.Namespace) -> int:
    from difflab.evaluate import evaluate_images
    from difflab.runs.data import pick_device

    if sum(a is not None for a in (args.run, args.samples, args.diffusers_model)) != 1:
        raise UsageError("give exactly one of --run DIR, --diffusers-model DIR or --samples FILE.npz")
    check_values({"--n": (args.n, 2, MAX_SAMPLES), "--seed": (args.seed, 0, MAX_SEED), "--steps": (args.steps, 1, 100_000),
                  "--guidance": (args.guidance, None, None), "--bpd-n": (args.bpd_n, 1, MAX_SAMPLES),
                  "--batch-size": (args.batch_size, 1, 1 << 16)})
    if args.json:
        check_output(args.json, "--json", force=args.force)
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    device = pick_device(args.device)
    images = labels = loaded_run = den = None
    if args.samples:
        images, labels = _read_samples(args.samples)
        if args.data is None:
            raise UsageError("with --samples, name the reference dataset with --data")
        like, labelled = tuple(images.shape[1:]), labels is not None
        label_max = int(labels.max()) if labelled else None
    else:
        model = _load(args, device)
        loaded_run = model if args.run else None
        den = None if args.run else model.denoiser
        traits = model.traits()
        like = loaded_run.cfg if loaded_run is not None else traits.shape
        labelled = traits.conditioning != "none"
        label_max = min(args.n, traits.num_classes) - 1 if labelled else None
    if not labelled and "accuracy" in metrics:
        metrics.remove("accuracy")
    reference = _reference(args.data or (loaded_run.cfg.data if loaded_run is not None else None), args.split, like,
                           metrics, args.features, args.n if images is None else len(images), labelled, label_max)
    if images is None:
        images, labels = _draw(args, model)
        if images is None:
            return 0
    result = evaluate_images(images, labels, reference, metrics, args.features, device=device, progress=True,
                             inception_precision=args.inception_precision)
    if args.run:
        result.update(run=str(args.run), step=loaded_run.step, sampler=args.sampler, steps=args.steps,
                      guidance=args.guidance, autoguidance=args.autoguidance, seed=args.seed)
    if args.diffusers_model:
        result.update(diffusers_model=str(args.diffusers_model), sampler=args.sampler, steps=args.steps, seed=args.seed)
    if args.bpd:
        result.update(_bpd(args, den, loaded_run, reference, device))
    _print_table(result)
    if args.json:
        path = write_text(args.json, json.dumps(_finite_or_null(result), indent=2, default=float, allow_nan=False))
        print(f"json: {path}")
    return 0


def _reference(name: str, split: str, like, metrics: list[str], features: str, n: int, labelled: bool,
               label_max: int | None):
    """The reference data, transformed as the run trained (``like``: its config, else the samples' shape), after
    checking that every piece the metrics need is there: one line naming all that is missing, before any sample
    is drawn; what only drops a metric is said in one ``note:`` line."""
    from difflab.evaluate import check_evaluation
    from difflab.runs.data import reference_data

    notes: list[str] = []
    reference = reference_data(name, split, like, notes)
    notes += check_evaluation(metrics, features, reference, n, labels=labelled, label_max=label_max)[1]
    if notes:
        print(f"note: {'; '.join(notes)}", file=sys.stderr)
    return reference


def _bpd(args: argparse.Namespace, den, loaded_run, reference, device) -> dict:
    """bits/dim of the first --bpd-n reference images (probability-flow ODE)."""
    if den is None and (loaded_run is None or not loaded_run.method.denoises):
        raise UsageError("--bpd needs --run of a Gaussian diffusion run or --diffusers-model")
    from difflab.likelihood import bits_per_dim

    den = den or loaded_run.denoiser()  # (a folder's: plain, its scheduler's plan belongs to a draw only)
    bpd = bits_per_dim(den, reference.images[: args.bpd_n], device=device, batch_size=args.batch_size)
    return {"bpd": float(bpd.mean()), "bpd_n": len(bpd)}


def _load(args: argparse.Namespace, device):
    """The run or diffusers folder that the samples are drawn from."""
    if args.diffusers_model:
        if args.data is None:
            raise UsageError("with --diffusers-model, name the reference dataset with --data")
        from difflab.interop.folder_model import FolderModel

        return FolderModel.load(args.diffusers_model, device)
    from difflab.runs.draw import load_run

    return load_run(args.run, device)


def _draw(args: argparse.Namespace, model):
    """(uint8 samples, labels) of ``model``, sharded over ranks (None samples on the ranks that do not compute
    the metrics); the sampler, steps and guidance used are set on ``args``."""
    from difflab.model import samples_for_evaluation
    from difflab.runs.distributed import DistContext

    images, labels, req = samples_for_evaluation(model, args.n, DistContext.from_env(model.device.type), seed=args.seed,
                                                 sampler=args.sampler, steps=args.steps, guidance=args.guidance,
                                                 autoguidance=args.autoguidance, batch_size=args.batch_size)
    args.sampler, args.steps, args.guidance = req.sampler, req.steps, 1.0 if req.guidance is None else req.guidance
    args.autoguidance = 1.0 if req.autoguidance is None else req.autoguidance
    return images, labels


def _read_samples(path: str):
    """(uint8 images, labels or None) of an .npz or a folder of PNGs (difflab sample --out-dir)."""
    if Path(path).is_dir():
        from difflab.outputs import read_sample_pngs

        return read_sample_pngs(path), None
    return _read_npz(path)


def _read_npz(path: str):
    p = Path(path)
    if not p.exists():
        raise UsageError(f"--samples file {path} does not exist")
    try:
        with np.load(p, allow_pickle=False) as f:
            images = f["images"]
            labels = f["labels"] if "labels" in f else None
    except (ValueError, KeyError, OSError) as e:
        raise UsageError(f"{path} is not a difflab samples file (uint8 'images' [N, H, W, C]): {e}") from e
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3) or len(images) < 2:
        raise UsageError(f"{path}: 'images' must be uint8 [N, H, W, C] with N >= 2 and C = 1 or 3, got "
                         f"{images.dtype} {list(images.shape)}")
    if labels is not None:
        check_array(f"{path} 'labels'", labels, kinds="iu", ndim=1, shape=(len(images),))
        if labels.min() < 0:
            raise UsageError(f"{path}: 'labels' must not be negative")
    t = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).contiguous()
    return t, (torch.from_numpy(labels).long() if labels is not None else None)


def _print_table(result: dict) -> None:
    rows = [("samples", result["n"]), ("reference", f"{result['reference']} ({result.get('reference_n')} images)"),
            ("features", result.get("features"))]
    for key in ("fid", "kid", "precision", "recall", "accuracy", "bpd", "classifier_test_accuracy"):
        if result.get(key) is not None:
            v = result[key]
            if key == "kid" and result.get("kid_std") is not None:
                rows.append((key, f"{v:.5f} +- {result['kid_std']:.5f}"))
            else:
                rows.append((key, f"{v:.4f}" if isinstance(v, float) and math.isfinite(v) else v))
    if result.get("colour") is not None:
        from difflab.evaluate.colour import describe

        rows.append(("colour", describe(result["colour"])))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    for w in result.get("warnings", []):
        print(f"warning: {w}")


def _finite_or_null(obj):
    """The results with NaN and infinities as null: JSON has no NaN, and readers reject it."""
    if isinstance(obj, dict):
        return {k: _finite_or_null(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_null(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    return obj
