"""``difflab distill``: a trained Gaussian run tuned into a consistency model (ECT, Geng et al. 2025) that draws
in one or two network evaluations, saved as a run folder of its own (method ``consistency``).

>>> from difflab.distill import distill
>>> distill("runs/demo", "runs/demo-ect", time_limit=5)        # then: difflab sample --run runs/demo-ect

The tuned run starts from the run's EMA weights (its x0 estimate is the initial consistency function), and trains
with the one Trainer (Adam, the run's EMA, checkpoints, Ctrl-C saves, ``resume=True`` continues). Its settings are
the run's own but for the method, the optimiser's and the sampling ones below; ``distill.json`` records where it
started and the ECT settings (:class:`~difflab.methods.consistency.Tuning`).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from difflab.config import TrainConfig, load_run_config, save_json
from difflab.errors import CheckpointError, UsageError
from difflab.methods.consistency import SIGMA_MID, Tuning
from difflab.methods.method import ConsistencyMethod, method_class
from difflab.training.trainer import Trainer, TrainResult

INFO = "distill.json"
LR_FACTOR = 0.1  # the tuning's learning rate against the run's (ECT tunes EDM's CIFAR-10 model at 1e-4)
# dropout while tuning a run trained without: 2-step classifier FID 86 -> 50 from the default MNIST run (RESULTS.md)
DROPOUT = 0.1


def distill(run: str | Path, out: str | Path, *, steps: int | None = None, time_limit: float | None = None,
            resume: bool = False, tuning: Tuning | None = None, lr: float | None = None,
            batch_size: int | None = None, sample_steps: int = 2, sigma_mid: float = SIGMA_MID,
            dropout: float | None = None, precision: str | None = None, device: str | None = None,
            progress: bool = True, log=print) -> TrainResult:
    """Tune run ``run`` into the consistency run ``out`` for ``steps`` optimiser steps or ``time_limit`` minutes
    (whichever ends first; neither: 10,000 steps). ``resume=True`` continues ``out`` (``run`` and ``tuning`` are
    then read from its ``distill.json``). ``lr`` defaults to a tenth of the run's; the run draws with ``sample_steps``
    consistency steps, the second from ``sigma_mid``; ``dropout`` (in the network's residual blocks) defaults to the
    run's, or ``DROPOUT`` where the run trained without."""
    out = Path(out)
    if resume and (out / "config.json").exists():
        cfg, tuning, network = _resumed(out, steps, time_limit, precision, device)
        trainer = Trainer(cfg, resume=True, progress=progress, log=log,
                          method=ConsistencyMethod(cfg, tuning, network))
    else:
        _check_out(out)
        cfg, weights, network, base = _from_base(Path(run), out, steps, time_limit, lr, batch_size, sample_steps,
                                                 sigma_mid, dropout, precision, device)
        tuning = tuning or Tuning()
        trainer = Trainer(cfg, progress=progress, log=log, method=ConsistencyMethod(cfg, tuning, network),
                          initial=weights)
        if trainer.dist.main:
            save_json(out / INFO, {"run": str(Path(run).resolve()), "run_step": base, "network": network,
                                   "tuning": tuning.to_json()})
    result = trainer.run()
    trainer.dist.shutdown()
    return result


def _check_out(out: Path) -> None:
    """A new tuned run's folder: new, empty, or (with --resume) a consistency run; never another run."""
    if (out / "config.json").exists():
        cfg = load_run_config(out)
        if not issubclass(method_class(cfg.method), ConsistencyMethod):
            raise UsageError(f"--out {out} holds a {cfg.method} run, not a tuned one; choose a new folder")
        raise UsageError(f"--out {out} already holds a tuned run; pass --resume to continue it or choose another --out")


def _from_base(run: Path, out: Path, steps, time_limit, lr, batch_size, sample_steps, sigma_mid, dropout, precision,
               device):
    """(config, EMA weights, network config, step) of a new tuned run of ``run``."""
    from difflab.runs.draw import load_run

    base = load_run(run)
    if not method_class(base.cfg.method).denoises:
        raise UsageError(f"--run {run} is a {base.cfg.method} run; consistency tuning starts from a Gaussian run "
                         "(trained with --method gaussian)")
    if base.conditioner.kind != "none":
        raise UsageError(f"--run {run} is {base.cfg.conditioning}-conditional; consistency tuning takes "
                         "unconditional runs")
    if sample_steps not in (1, 2):
        raise UsageError(f"a tuned run draws in 1 or 2 steps, got {sample_steps}")
    network = base.network
    if dropout is not None and not 0 <= dropout < 1:
        raise UsageError(f"--dropout must be in [0, 1), got {dropout}")
    if network is not None and "dropout" in network:
        dropout = float(network["dropout"] or DROPOUT) if dropout is None else float(dropout)
        network = {**network, "dropout": dropout}
    elif dropout is not None:
        raise UsageError(f"--run {run}'s network has no dropout to set; leave --dropout out")
    given = {**({} if dropout is None else {"dropout": dropout}),
             "steps": steps if steps is not None else 10_000, "time_limit": time_limit or 0.0,
             "lr": lr if lr is not None else base.cfg.lr * LR_FACTOR, "batch_size": batch_size or base.cfg.batch_size,
             "precision": precision or base.cfg.precision, "device": device or base.cfg.device}
    cfg = dataclasses.replace(
        base.cfg, method=ConsistencyMethod.name, out=str(out), warmup=0, lr_decay="none", grad_accum=1,
        # ECT's own: lognormal levels, no loss weighting of diffusion training's, no autoguidance guide
        noise_sampling="uniform", loss_weighting="none", time_shift=1.0, ema_track="", ema_snapshot_every=0,
        autoguidance=1.0, sample_steps=sample_steps, sample_sigma_min=float(sigma_mid), sample_every=0,
        eval_every=0, checkpoint_every=200, keep=10, **given)
    weights = {k: v.float().contiguous() for k, v in base.net.state_dict().items()}
    return cfg, weights, network, base.step


def _resumed(out: Path, steps, time_limit, precision, device) -> tuple[TrainConfig, Tuning, dict]:
    """(config, tuning, network) of the tuned run ``out`` being resumed, with the settings given changed."""
    cfg = load_run_config(out)
    if not issubclass(method_class(cfg.method), ConsistencyMethod):
        raise UsageError(f"--out {out} holds a {cfg.method} run, not a tuned one (difflab distill); choose a new "
                         "folder, or resume it with difflab train --resume")
    try:
        info = json.loads((out / INFO).read_text())
        tuning, network = Tuning.from_json(info["tuning"]), info["network"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{out}/{INFO} is missing or damaged ({e}); the tuned run cannot be resumed") from None
    changed = {"steps": steps, "time_limit": time_limit, "precision": precision, "device": device}
    return dataclasses.replace(cfg, **{k: v for k, v in changed.items() if v is not None}), tuning, network
