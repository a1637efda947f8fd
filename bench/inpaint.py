"""Inpainting MNIST test digits with a trained run (issue 26's target): the lower half of each digit drawn
anew by RePaint, and the completed digit judged by the race's MNIST classifier (bench/quality_race.Judge).

    python bench/inpaint.py --run RUN [--n 256] [--settings default ddpm-50 ddpm-50-r2 ...]

Reports, per setting: the fraction of completed digits the judge gives the original's class (``kept``), the
judge's accuracy on the untouched digits and on the upper halves alone (lower half set to the background),
the network evaluations per image and the seconds. Quality does not depend on machine load; seconds do.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_description, write_json  # noqa: E402
from quality_race import Judge  # noqa: E402

# name -> Model.edit settings ({}: Model.edit's own for a mask, editing.REPAINT_DEFAULTS)
SETTINGS = {
    "default": {},
    "ddpm-50": {"sampler": "ddpm", "steps": 50},
    "ddpm-50-r2": {"sampler": "ddpm", "steps": 50, "jump_length": 10, "resample": 2},
    "ddpm-50-r4": {"sampler": "ddpm", "steps": 50, "jump_length": 10, "resample": 4},
    "ddpm-100-r2": {"sampler": "ddpm", "steps": 100, "jump_length": 10, "resample": 2},
    "ddpm-50-r4-ag1": {"sampler": "ddpm", "steps": 50, "jump_length": 10, "resample": 4, "autoguidance": 1.0},
    "ddpm-50-r10": {"sampler": "ddpm", "steps": 50, "jump_length": 10, "resample": 10},
    "ddpm-100-r4": {"sampler": "ddpm", "steps": 100, "jump_length": 10, "resample": 4},
    "ddpm-50-r4-j5": {"sampler": "ddpm", "steps": 50, "jump_length": 5, "resample": 4},
    "ddpm-50-r10-ag1": {"sampler": "ddpm", "steps": 50, "jump_length": 10, "resample": 10, "autoguidance": 1.0},
    "ddpm-50-r20": {"sampler": "ddpm", "steps": 50, "jump_length": 10, "resample": 20},
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True)
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--json")
    args = p.parse_args(argv)

    import difflab
    from difflab.data import load

    print(cpu_description())
    judge = Judge(torch.device("cpu"))
    test = load("mnist", split="test", pad_to=32)
    images, labels = test.images[:args.n], test.labels[:args.n]
    model = difflab.load(args.run)
    lower = torch.zeros(images.shape[-2:], dtype=torch.bool)
    lower[images.shape[-2] // 2:] = True
    upper_only = images.clone()
    upper_only[..., images.shape[-2] // 2:, :] = 0
    base = {"original": judge.judge(images, labels)["accuracy"], "upper_half_only": judge.judge(upper_only, labels)["accuracy"]}
    print(f"judge on the originals {base['original']:.3f}, on the upper halves alone {base['upper_half_only']:.3f}")
    results = {"run": args.run, "n": args.n, "baseline": base, "settings": {}}
    for name in args.settings:
        t0 = time.perf_counter()
        out = model.edit(images, mask=lower, seed=0, **SETTINGS[name])
        seconds = time.perf_counter() - t0
        verdict = judge.judge(out, labels)
        row = {"kept": verdict["accuracy"], "confident": verdict["confident"], "seconds": round(seconds, 1),
               **SETTINGS[name]}
        results["settings"][name] = row
        print(f"{name:12s} class kept {row['kept']:.3f}  confident {row['confident']:.3f}  {seconds:.0f} s")
    write_json(args.json, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
