"""Sanity figure of the evaluation: one real split against another, in Inception (or classifier) features.

    python bench/reference_fid.py --data fashion-mnist --n 10000 --json fmnist-ref.json

Compares the first ``--n`` test images with the first ``--n`` training images (``--train-n`` to
use more training images) and prints FID, KID (+- its standard deviation over subsets),
precision, recall and the seconds spent extracting features. Both feature sets land in the
reference cache, so later ``difflab evaluate`` calls against either split reuse them. Real
data against real data of the same distribution should give a FID near 1-2 and a KID near 0.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from common import write_json  # (also puts src/ on the path when run from a checkout)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="mnist")
    p.add_argument("--n", type=int, default=10_000, help="test images (and training images unless --train-n)")
    p.add_argument("--train-n", type=int, default=None)
    p.add_argument("--features", default="inception", choices=["inception", "classifier"])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    from difflab.data import load
    from difflab.evaluate import (
        ClassifierFeatures,
        InceptionFeatures,
        frechet_distance,
        kid,
        load_or_train_classifier,
        precision_recall,
        reference_stats,
    )
    from difflab.training.trainer import pick_device

    device = pick_device(args.device)
    test = load(args.data, split="test")
    train = load(args.data, split="train")
    test, train = test.subset(min(args.n, len(test))), train.subset(min(args.train_n or args.n, len(train)))
    if args.features == "inception":
        extractor = InceptionFeatures(device=device, batch_size=args.batch_size, progress=True)
    else:
        model, meta = load_or_train_classifier(load(args.data, split="train"), device=device)
        extractor = ClassifierFeatures(model, name=meta["key"])
    seconds = {}
    stats = {}
    for name, part in (("test", test), ("train", train)):
        t0 = time.perf_counter()
        stats[name] = reference_stats(part, extractor=extractor)
        seconds[name] = time.perf_counter() - t0
    a, b = stats["test"], stats["train"]
    kid_value, kid_std = kid(a["features"], b["features"])
    precision, recall = precision_recall(b["features"], a["features"])
    result = {
        "data": args.data, "features": extractor.name, "test_n": len(test), "train_n": len(train),
        "fid": frechet_distance(a["mu"], a["sigma"], b["mu"], b["sigma"]), "kid": kid_value, "kid_std": kid_std,
        "precision": precision, "recall": recall, "seconds": seconds, "device": str(device),
        "threads": torch.get_num_threads(),
    }
    print(f"{args.data}: test ({len(test)}) against train ({len(train)}), {extractor.name} features")
    print(f"  FID {result['fid']:.4f}   KID {kid_value:.3e} +- {kid_std:.3e}   "
          f"precision {precision:.3f}   recall {recall:.3f}")
    print(f"  feature extraction: test {seconds['test']:.0f} s, train {seconds['train']:.0f} s "
          f"(0 s means it came from the cache) on {device} with {torch.get_num_threads()} threads")
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
