"""Post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion
Models", sec. 3.2): the EMA of any relative length, built after training.

During training the power EMAs of a few lengths (``--ema-track``) are saved every
``--ema-snapshot-every`` steps into ``RUN/ema-snapshots/step-NNNNNNN.safetensors`` (+ JSON, written
and verified like checkpoints). A snapshot of exponent gamma_k after t_k updates is the average of
the weights under the power profile p_k (see :mod:`difflab.runs.ema`); sums of snapshots are
averages under sums of profiles, so the EMA of a target profile is sum_k x_k snapshot_k with x the
least-squares fit of the target profile by the snapshots' profiles (their inner products have a
closed form). The target ends at the latest snapshot. ``difflab ema`` writes the result to
``RUN/ema/ema-0.080.safetensors``; ``load_run(..., ema_length=X)`` reads it, or builds it when it is
missing or older than the snapshots.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from difflab import nets
from difflab.ema_lengths import check_ema_length, gamma_of_sigma_rel
from difflab.errors import CheckpointError, UsageError
from difflab.runs.checkpoint import (
    list_checkpoints,
    load_checkpoint,
    read_meta,
    save_checkpoint,
    write_tensor_file,
)
from difflab.runs.ema import PowerEMA, posthoc_coefficients

SNAPSHOTS = "ema-snapshots"
POSTHOC = "ema"


def save_snapshot(run: str | Path, step: int, tracked: list[PowerEMA]) -> Path | None:
    """Write the tracked EMAs of ``step`` (all snapshots are kept); None when there is nothing to
    write or the snapshot exists (a resumed run reaches the step of its checkpoint again)."""
    folder = Path(run) / SNAPSHOTS
    if not tracked or tracked[0].updates == 0 or (folder / f"step-{step:07d}.json").exists():
        return None
    tensors = {f"ema{i}.{k}": v for i, e in enumerate(tracked) for k, v in e.state_dict().items()}
    meta = {"kind": "ema-snapshot", "ema_lengths": [e.sigma_rel for e in tracked],
            "gammas": [e.gamma for e in tracked], "updates": [e.updates for e in tracked]}
    return save_checkpoint(folder, step, tensors, meta, keep=0)


def drop_snapshots_after(run: str | Path, step: int) -> None:
    """On resume: delete the snapshots written after the checkpoint (they will be made again)."""
    for js in list_checkpoints(Path(run) / SNAPSHOTS):
        if _file_step(js) > step:
            js.with_suffix(".safetensors").unlink(missing_ok=True)
            js.unlink()


def _file_step(js: Path) -> int:
    return int(js.stem.split("-")[1])


def snapshot_meta(js: Path) -> dict:
    """A snapshot's JSON with every field the reconstruction reads checked (CheckpointError naming the file):
    its step that of its name, one length, gamma and positive update count per tracked EMA, each gamma the
    exponent of its length."""
    meta = read_meta(js)

    def bad(why: str) -> CheckpointError:
        return CheckpointError(f"EMA snapshot {js} is damaged ({why}); delete it and its .safetensors")

    lengths, gammas, updates = (meta.get(k) for k in ("ema_lengths", "gammas", "updates"))
    if meta.get("kind") != "ema-snapshot":
        raise bad(f"its kind is {meta.get('kind')!r}, not 'ema-snapshot'")
    if meta["step"] != _file_step(js):
        raise bad(f"its step {meta['step']} is not the {_file_step(js)} of its name")
    for key, value in (("ema_lengths", lengths), ("gammas", gammas), ("updates", updates)):
        if not isinstance(value, list) or not value:
            raise bad(f"'{key}' is not a non-empty list")
        if len(value) != len(lengths):
            raise bad(f"'{key}' lists {len(value)} values for {len(lengths)} EMAs")
    for length, gamma, count in zip(lengths, gammas, updates):
        try:
            check_ema_length(length, "ema_lengths")
        except UsageError as e:
            raise bad(str(e)) from None
        if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or \
                not math.isclose(gamma, gamma_of_sigma_rel(length), rel_tol=1e-6):
            raise bad(f"gamma {gamma!r} is not the exponent of length {length}")
        if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= 2**53:
            raise bad(f"update count {count!r} is not a positive whole number")
    return meta


def _snapshot_metas(run: Path) -> list[tuple[Path, dict]]:
    metas = [(js, snapshot_meta(js)) for js in list_checkpoints(run / SNAPSHOTS)]
    if not metas:
        raise CheckpointError(f"'{run}' has no EMA snapshots (train with --ema-track and --ema-snapshot-every)")
    return metas


def _snapshot_emas(js: Path, meta: dict, layout: dict | None, device="cpu") -> list[dict[str, torch.Tensor]]:
    """The tracked EMAs of one snapshot (verified), one per entry of its JSON, each with the tensor names,
    shapes and dtypes of ``layout`` (those of the first snapshot; None: this is the first)."""
    tensors, _ = load_checkpoint(js, device)
    emas = [nets.split_prefix(tensors, f"ema{i}") for i in range(len(meta["updates"]))]
    held = {name.split(".", 1)[0] for name in tensors}
    if held != {f"ema{i}" for i in range(len(emas))}:
        raise CheckpointError(f"EMA snapshot {js} claims {len(emas)} EMAs but its tensors hold {len(held)}; "
                              "delete it and its .safetensors")
    for ema in emas:
        shapes = {name: (v.shape, v.dtype) for name, v in ema.items()}
        if shapes != (layout if layout is not None else {n: (v.shape, v.dtype) for n, v in emas[0].items()}):
            raise CheckpointError(f"EMA snapshot {js} holds other tensors than the run's other snapshots "
                                  "(another network?); delete it and its .safetensors")
    return emas


def reconstruct_ema(run: str | Path, ema_length: float) -> tuple[dict[str, torch.Tensor], dict]:
    """The weights of the power EMA of relative length ``ema_length`` at the latest snapshot, from all
    snapshots (summed in float64), and a JSON-able description (step, gamma, fit error)."""
    run = Path(run)
    check_ema_length(ema_length)
    metas = _snapshot_metas(run)
    profiles = [(t, g) for _, m in metas for t, g in zip(m["updates"], m["gammas"])]
    gamma = gamma_of_sigma_rel(ema_length)
    t_target = max(p[0] for p in profiles)
    coef, err = posthoc_coefficients(np.array([p[0] for p in profiles]), np.array([p[1] for p in profiles]),
                                     t_target, gamma)
    acc: dict[str, torch.Tensor] = {}
    coefs = iter(coef)
    layout = None
    for js, m in metas:
        for ema in _snapshot_emas(js, m, layout):
            c = float(next(coefs))
            for name, v in ema.items():
                if not v.is_floating_point():  # integer buffers are not averaged: the latest one's
                    acc[name] = v
                    continue
                acc[name] = acc.get(name, torch.zeros(v.shape, dtype=torch.float64)) + c * v.double()
            layout = {name: (v.shape, v.dtype) for name, v in ema.items()}
    weights = {name: v.to(layout[name][1]) for name, v in acc.items()}
    info = {"kind": "posthoc-ema", "ema_length": ema_length, "gamma": gamma, "step": int(metas[-1][1]["step"]),
            "snapshots": len(metas), "profiles": len(profiles), "profile_error": err}
    return weights, info


def posthoc_stem(ema_length: float) -> str:
    """``ema-0.080`` (three decimals when they are exact, else every digit needed)."""
    return f"ema-{ema_length:.3f}" if round(ema_length, 3) == ema_length else f"ema-{ema_length!r}"


def save_posthoc_ema(run: str | Path, ema_length: float, force: bool = False) -> tuple[Path, dict]:
    """Build the EMA of ``ema_length`` and write it as ``RUN/ema/ema-X.safetensors`` (+ JSON); an
    existing one is overwritten only with ``force``. Returns the JSON's path and the description."""
    run = Path(run)
    check_ema_length(ema_length)
    stem = posthoc_stem(ema_length)
    target = run / POSTHOC / f"{stem}.safetensors"
    if target.exists() and not force:
        raise UsageError(f"{target} exists; pass --force to build it again")
    weights, info = reconstruct_ema(run, ema_length)
    return write_tensor_file(run / POSTHOC, stem, weights, info), info


def load_posthoc_ema(run: str | Path, ema_length: float, device="cpu") -> tuple[dict[str, torch.Tensor], dict]:
    """The EMA of ``ema_length``: the file ``difflab ema`` saved when it is as new as the latest
    snapshot, else built now (not saved)."""
    run = Path(run)
    check_ema_length(ema_length)
    js = run / POSTHOC / f"{posthoc_stem(ema_length)}.json"
    if js.exists():
        tensors, info = load_checkpoint(js, device)
        if info.get("ema_length") == ema_length and info.get("step") == _snapshot_metas(run)[-1][1].get("step"):
            return tensors, info
    weights, info = reconstruct_ema(run, ema_length)
    return {k: v.to(device) for k, v in weights.items()}, info


def guide_snapshot(run: str | Path, fraction: float, step: int | None = None) -> Path | None:
    """The EMA snapshot nearest ``fraction`` of ``step`` (default: the latest snapshot's), among those at most
    half of it (a weaker model for autoguidance); None when the run has none so early. Reads file names only."""
    steps = {int(js.stem.split("-")[1]): js for js in list_checkpoints(Path(run) / SNAPSHOTS)}
    if not steps:
        return None
    last = max(steps) if step is None else step
    early = [s for s in steps if s <= last / 2]
    return steps[min(early, key=lambda s: abs(s - fraction * last))] if early else None


def load_guide(run: str | Path, fraction: float, ema_length: float, device="cpu",
               step: int | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """The weights of :func:`guide_snapshot` (verified), of its tracked EMA nearest ``ema_length`` in length,
    and a description (step, ema_length). CheckpointError when the run has no snapshot early enough."""
    js = guide_snapshot(run, fraction, step)
    if js is None:
        raise CheckpointError(f"'{run}' has no EMA snapshot from its first half (train with --ema-snapshot-every "
                              "smaller than half the steps); autoguidance needs one")
    meta = snapshot_meta(js)
    lengths = meta["ema_lengths"]
    slot = min(range(len(lengths)), key=lambda i: abs(lengths[i] - ema_length))
    return _snapshot_emas(js, meta, None, device)[slot], {"step": int(meta["step"]), "ema_length": lengths[slot]}
