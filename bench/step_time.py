"""The cost of one ``Trainer.train_step`` with the defaults for ``--data DATA``, of whichever difflab is on the
path: run it in alternation with ``PYTHONPATH=CHECKOUT/src`` to compare two checkouts' steps, apart from the
loop around them (hooks, logging, saves).

    PYTHONPATH=/work/wt/base135/src python bench/step_time.py FOLDER 60
    PYTHONPATH=src python bench/step_time.py FOLDER 60
    PYTHONPATH=src python bench/step_time.py FOLDER 60 process=flow   # settings as the recipe makes them
"""

from __future__ import annotations

import sys
import tempfile
import time


def main(argv: list[str] | None = None) -> int:
    import difflab
    from difflab.config import TrainConfig
    from difflab.training.trainer import Trainer

    args = sys.argv[1:] if argv is None else argv
    if len(args) < 2:
        raise SystemExit(__doc__)
    data, n = args[0], int(args[1])
    out = tempfile.mkdtemp(prefix="difflab-step-time-")
    given = dict(a.split("=", 1) for a in args[2:])
    try:  # the recipe's defaults for what is given (a checkout that has difflab.recipe)
        from difflab.recipe import build_config
        cfg = build_config({"data": data, "out": f"{out}/run", "steps": 10_000, "sample_every": 0, **given})
    except ImportError:
        cfg = TrainConfig(data=data, out=f"{out}/run", steps=10_000, sample_every=0, **given)
    tr = Trainer(cfg, progress=False, log=lambda *a: None)
    for s in range(20):  # warm-up: kernels chosen, allocator grown
        tr.train_step(s)
    t = time.perf_counter()
    for s in range(20, 20 + n):
        float(tr.train_step(s))
    dt = (time.perf_counter() - t) / n
    print(f"{difflab.__file__}: {dt * 1e3:.1f} ms a step, {tr.cfg.batch_size / dt:.0f} images/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
