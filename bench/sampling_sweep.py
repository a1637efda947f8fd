"""Sampling settings of one trained MNIST run, judged by the race's classifier: how the sampling defaults
were chosen (bench/RESULTS.md). Each SETTINGS is comma-separated ``name=value`` of ``Run.sample`` (the
run's defaults for the rest; ``guide_sigmas=LO:HI``, ``cold_update=0|1``, ``guide_keep_mean=0|1``); ``defaults``
is the run's own.

    python bench/sampling_sweep.py RUN --n 512 defaults "steps=7" "steps=7,sigma_min=0" "steps=5,guide_sigmas=0:inf"

Prints, per setting: network evaluations per sample (NFE, as ``request_evaluations`` counts them),
confident fraction, rarest digit, accuracy (class runs: each digit asked for in turn; text runs: a tenth of
the samples for each digit's prompt, ``--prompt`` with ``{word}`` the digit's name) and classifier FID over the
same samples.
"""

from __future__ import annotations

import argparse
import time

import torch
from common import cpu_description, write_json  # (also puts src/ on the path)
from quality_race import Judge

INTS, TEXT = ("steps", "order"), ("sampler", "clip", "spacing")


def parse(settings: str) -> dict:
    """'steps=7,guide_sigmas=1:20' as Run.sample keywords."""
    out: dict = {}
    for item in filter(None, settings.replace("defaults", "").split(",")):
        name, value = item.split("=", 1)
        if name == "guide_sigmas":
            out[name] = tuple(float(v) for v in value.split(":"))
        elif name in ("cold_update", "guide_keep_mean"):
            out[name] = value == "1"
        else:
            out[name] = int(value) if name in INTS else value if name in TEXT else float(value)
    return out


def main(argv=None) -> int:
    from difflab.runs.draw import load_run, request_evaluations
    from difflab.runs.request import SampleRequest

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run")
    p.add_argument("settings", nargs="*", default=["defaults"])
    p.add_argument("--n", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    p.add_argument("--prompt", default="a handwritten {word}", help="text runs: each digit's prompt")
    args = p.parse_intermixed_args(argv)
    print(cpu_description(), flush=True)
    run, judge = load_run(args.run), Judge(torch.device("cpu"))
    text = run.conditioner.kind == "text"
    if text and args.n % 10:
        p.error("a text run's --n must be a multiple of 10 (a tenth for each digit)")
    labels = torch.arange(args.n) % run.conditioner.num_classes if run.conditioner.kind == "class" else None
    if text:
        labels = torch.arange(10).repeat_interleave(args.n // 10)
    rows = {}
    for settings in args.settings:
        kw = parse(settings)
        t0 = time.monotonic()
        images = draw_text(run, args, kw) if text else run.sample(args.n, seed=args.seed, **kw)
        r = judge.judge(images, labels=labels, fid_n=args.n) | {"seconds": time.monotonic() - t0}
        asked = {"prompt": args.prompt.format(word="zero")} if text else {}
        r["nfe"] = request_evaluations(run, SampleRequest(n=args.n, **asked, **kw)) if run.method.conditional else None
        rows[settings] = r
        acc = f" accuracy {r['accuracy']:.3f}" if "accuracy" in r else ""
        print(f"{settings:50s} NFE {r['nfe']} confident {r['confident']:.3f} rarest {r['rarest']}"
              f"{acc} classifier FID {r['classifier_fid']:.1f} per digit {r['histogram']} ({r['seconds']:.0f} s)",
              flush=True)
    if args.json:
        write_json(args.json, {"run": args.run, "n": args.n, "cpu": cpu_description(), "rows": rows})
    return 0


def draw_text(run, args, kw: dict) -> torch.Tensor:
    """A text run's samples: n / 10 for each digit's prompt, digit d's from sample index d n / 10 on."""
    from difflab.data.captions import DIGIT_WORDS

    per = args.n // 10
    return torch.cat([run.sample(per, seed=args.seed, start=d * per, prompt=args.prompt.format(word=word), **kw)
                      for d, word in enumerate(DIGIT_WORDS)])


if __name__ == "__main__":
    raise SystemExit(main())
