"""Quality against the number of model evaluations (NFE), for every sampler, from one trained run.

    python bench/quality.py --run runs/demo --n 500 --steps 10,20,50,100 --features classifier

Prints a markdown table (rows: samplers; columns: steps, with the NFE each sampler spends in
brackets) of one metric (FID by default, with the features named in the header), and writes
every number to --json. The same per-sample seeds are used for every cell, so the cells differ
only by the sampler and its number of steps.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from common import write_json  # (also puts src/ on the path when run from a checkout)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True)
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--steps", default="10,20,50,100,1000")
    p.add_argument("--samplers", default="ddpm,ddim,euler,heun,dpmpp-2m,sde,pc")
    p.add_argument("--metric", default="fid", choices=["fid", "kid", "precision", "recall"])
    p.add_argument("--features", default="classifier", choices=["classifier", "inception"])
    p.add_argument("--split", default="test")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    from difflab.evaluate import evaluate_images
    from difflab.runs.data import pick_device, reference_data
    from difflab.runs.draw import load_run
    from difflab.samplers import evaluations

    device = pick_device(args.device)
    run = load_run(args.run, device)
    steps = [int(s) for s in args.steps.split(",")]
    samplers = args.samplers.split(",")
    reference = reference_data(run.cfg.data, args.split, run.shape)
    labels = (torch.arange(args.n) % run.conditioner.num_classes) if run.conditioner.kind != "none" else None
    results = {}
    for sampler in samplers:
        for k in steps:
            t0 = time.perf_counter()
            images = run.sample(args.n, seed=0, sampler=sampler, steps=k, labels=labels)
            seconds = time.perf_counter() - t0
            r = evaluate_images(images, labels, reference, [args.metric], args.features, device=device)
            results[f"{sampler}/{k}"] = {"sampler": sampler, "steps": k, "nfe": evaluations(sampler, k),
                                         args.metric: r[args.metric], "seconds": seconds,
                                         "features": r["features"]}
            print(f"{sampler:9s} steps {k:5d} nfe {evaluations(sampler, k):5d} {args.metric} "
                  f"{r[args.metric]:.4f} ({seconds:.1f} s)", file=sys.stderr, flush=True)
    feats = next(iter(results.values()))["features"]
    print(f"\n{args.metric.upper()} of {args.n} samples against {reference.name} ({args.split}), "
          f"features {feats}; run {args.run} at step {run.step}\n")
    print("| sampler | " + " | ".join(f"{k} steps" for k in steps) + " |")
    print("| --- |" + " ---: |" * len(steps))
    for sampler in samplers:
        cells = [f"{results[f'{sampler}/{k}'][args.metric]:.3f} ({results[f'{sampler}/{k}']['nfe']} NFE)"
                 for k in steps]
        print(f"| {sampler} | " + " | ".join(cells) + " |")
    write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
