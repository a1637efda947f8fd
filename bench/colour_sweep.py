"""Sampling settings of one trained colour run, judged by Inception KID/FID and the colour statistics against
the run's own training images (as it trained on them): how guidance defaults are chosen on colour data.
SETTINGS are those of ``bench/sampling_sweep.py`` (comma-separated ``name=value`` of ``Run.sample``;
``defaults`` is the run's own).

    python bench/colour_sweep.py RUN --n 500 --reference-n 1000 defaults autoguidance=1 guidance_rescale=0.7

Prints, per setting: network evaluations per sample, KID x 1e3, FID (from few samples: compare within a
table only), mean saturation and brightness (relative to the data's) and the largest hue-sixth difference of
saturated pixels, and whether the issue-23 colour targets hold (within 15%, no sixth off by more than 0.06).
"""

from __future__ import annotations

import argparse
import time

import torch
from common import cpu_description, write_json  # (also puts src/ on the path)
from sampling_sweep import parse


def main(argv=None) -> int:
    from difflab.evaluate import evaluate_images
    from difflab.evaluate.colour import describe
    from difflab.runs.data import reference_data
    from difflab.runs.draw import load_run, request_evaluations
    from difflab.runs.request import SampleRequest

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run")
    p.add_argument("settings", nargs="*", default=["defaults"])
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--reference-n", type=int, default=1000, help="training images compared with (seeded subset)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    args = p.parse_intermixed_args(argv)
    print(cpu_description(), flush=True)
    run = load_run(args.run)
    data = reference_data(run.cfg.data, "train", run.cfg)
    pick = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))[:args.reference_n]
    reference = data.subset(pick)
    rows = {}
    for settings in args.settings:
        kw = parse(settings)
        t0 = time.monotonic()
        images = run.sample(args.n, seed=args.seed, **kw)
        r = evaluate_images(images, None, reference, ["kid", "fid", "colour"], "inception", progress=False)
        c = r["colour"]
        r |= {"seconds": time.monotonic() - t0,
              "nfe": request_evaluations(run, SampleRequest(n=args.n, **kw)) if run.method.conditional else None}
        rows[settings] = r
        print(f"{settings:40s} NFE {r['nfe']} KIDx1e3 {1e3 * r['kid']:.1f} FID {r['fid']:.1f} | {describe(c)} "
              f"({r['seconds']:.0f} s)", flush=True)
    if args.json:
        write_json(args.json, {"run": args.run, "n": args.n, "reference_n": len(reference), "cpu": cpu_description(),
                               "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
