"""Checkpoints that are never half-written: tensors in safetensors, everything else
in JSON (never pickle).

``step-0000123.safetensors`` is written under a temporary name, flushed and renamed;
then ``step-0000123.json`` (config, step, optimiser hyper-parameters, and the
SHA-256 of the tensor file) is written the same way. A checkpoint counts only
when its JSON exists and the checksum matches, so a crash at any moment leaves
the previous checkpoint as the latest complete one.

A checksum mismatch cannot come from a crash (the JSON is written only after the
tensor file is complete and synced): it means the storage or a copy damaged the
file. Resuming then stops with a one-line error naming the newest checkpoint that
does verify, instead of silently falling back and throwing steps away.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from difflab.errors import CheckpointError
from difflab.files import OutputError, atomic_write, write_text

_NAME = re.compile(r"^step-(\d{7,})\.json$")


def sha256_file(path: Path) -> str:
    """SHA-256 hex digest of a file, read in 4 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _test_pause() -> None:
    """Fault-injection hook for the kill tests: DIFFLAB_TEST_SLOW_CHECKPOINT=SECONDS sleeps at each
    stage of a write, so a test can SIGKILL the writer mid-checkpoint."""
    delay = float(os.environ.get("DIFFLAB_TEST_SLOW_CHECKPOINT") or 0)
    if delay > 0:
        time.sleep(delay)


def _write_tensors(tmp: Path, tensors: dict[str, torch.Tensor], header: dict[str, str] | None = None) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=header)
    _test_pause()


# the key of the tensor file's header that holds the SHA-256 of its JSON (so the tensor file's checksum covers
# the JSON too: image shape, class names, config and network, everything that decides how the weights are read)
META_DIGEST = "difflab_meta_sha256"
_UNCOVERED = ("tensors", "sha256", "format")  # the JSON's own fields about the tensor file, written after it


def meta_digest(meta: dict[str, Any]) -> str:
    """SHA-256 of the JSON fields a checkpoint's tensor file vouches for, in a canonical form that survives
    the JSON round trip (sorted keys; tuples and lists alike)."""
    kept = json.loads(json.dumps({k: v for k, v in meta.items() if k not in _UNCOVERED}, allow_nan=False))
    return hashlib.sha256(json.dumps(kept, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def non_finite(tensors: dict[str, torch.Tensor]) -> list[str]:
    """The names of the floating-point tensors holding a NaN or an infinity."""
    return [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]


def write_tensor_file(folder: str | Path, stem: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    """Atomically write ``STEM.safetensors``, then ``STEM.json`` (``meta`` and the tensor file's SHA-256)
    into ``folder``; returns the JSON's path. Every tensor file of a run (checkpoints, EMA snapshots,
    post-hoc EMAs) is written by this function and read back verified by :func:`load_checkpoint`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    st, js = folder / f"{stem}.safetensors", folder / f"{stem}.json"
    header = {META_DIGEST: meta_digest(meta)}
    atomic_write(st, lambda tmp: _write_tensors(tmp, tensors, header))
    _test_pause()
    meta = {**meta, "tensors": st.name, "sha256": sha256_file(st), "format": "difflab-checkpoint-1"}
    try:
        write_text(js, json.dumps(meta, indent=1, sort_keys=True, allow_nan=False))
    except OutputError:
        st.unlink(missing_ok=True)  # a tensor file without its JSON is no checkpoint: leave nothing half-written
        raise
    return js


def save_checkpoint(folder: str | Path, step: int, tensors: dict[str, torch.Tensor], meta: dict[str, Any],
                    keep: int = 3) -> Path:
    """Atomically write checkpoint ``step`` into ``folder`` and keep only the newest ``keep`` (0: all)."""
    folder = Path(folder)
    js = write_tensor_file(folder, f"step-{step:07d}", tensors, {**meta, "step": step})
    for old in list_checkpoints(folder)[:-keep] if keep > 0 else []:
        for p in (old, old.with_suffix(".safetensors")):
            p.unlink(missing_ok=True)
    orphans = [p for p in folder.glob("step-*.safetensors") if not p.with_suffix(".json").exists()]
    for stale in [*folder.glob(".step-*.tmp"), *orphans]:  # leftovers of a killed writer
        stale.unlink(missing_ok=True)
    return js


def list_checkpoints(folder: str | Path) -> list[Path]:
    """The JSON files of complete-looking checkpoints, oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if _NAME.match(p.name)), key=lambda p: int(_NAME.match(p.name)[1]))


def read_meta(json_path: str | Path) -> dict:
    """A checkpoint's JSON, its keys and types checked (not yet its tensor file): CheckpointError if it is not
    a regular file (a FIFO would block the reader), cannot be parsed, or lacks what the readers rely on."""
    json_path = Path(json_path)
    if not json_path.is_file():
        raise CheckpointError(f"checkpoint {json_path} is not a regular file; delete it to fall back to an older one")
    try:
        meta = json.loads(json_path.read_text())
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CheckpointError(f"checkpoint {json_path} is unreadable ({e.__class__.__name__}); "
                              "delete it to fall back to an older one") from e
    _check_meta(json_path, meta)
    return meta


def _verified(json_path: Path) -> tuple[dict, Path]:
    """The checkpoint's metadata and tensor file, after checking the file's SHA-256 (CheckpointError if not)."""
    meta = read_meta(json_path)
    st = json_path.with_name(meta["tensors"])
    if not st.is_file():
        raise CheckpointError(f"checkpoint {json_path.name} has no tensor file {st.name}; delete the JSON to use an older one")
    if meta.get("sha256") != sha256_file(st):
        raise CheckpointError(f"checkpoint {json_path}: its tensor file {st.name} is corrupt (checksum mismatch); "
                              "delete both to resume from an older one")
    vouched = _header(st).get(META_DIGEST)  # (absent in checkpoints written before it was)
    if vouched is not None and vouched != _digest_or_none(meta):
        raise CheckpointError(f"checkpoint {json_path} was edited after it was written (its tensor file vouches "
                              "for other settings); restore it, or delete it and its .safetensors")
    return meta, st


def _digest_or_none(meta: dict) -> str | None:
    try:
        return meta_digest(meta)
    except ValueError:  # NaN or infinity, which difflab never writes
        return None


def _header(st: Path) -> dict[str, str]:
    """The metadata of a safetensors file's header (read without its tensors)."""
    try:
        with safe_open(str(st), framework="pt") as f:
            return f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for a damaged header
        raise CheckpointError(f"checkpoint {st} cannot be read ({str(e).splitlines()[0] if str(e) else e!r}); "
                              "delete it to use an older one") from e


# what every checkpoint JSON holds, and the types the readers rely on
_META_TYPES = {"step": int, "tensors": str, "sha256": str}
_META_OPTIONAL = {"config": dict, "network": dict, "optimizer": dict, "ema_updates": int, "image_shape": list,
                  "world_size": int, "class_names": (list, type(None)), "data_fingerprint": (str, type(None))}


def _check_meta(json_path: Path, meta: object) -> None:
    """The JSON's keys and types, and its tensor file a plain name beside it (never a path elsewhere)."""
    def bad(why: str) -> CheckpointError:
        return CheckpointError(f"checkpoint {json_path} is damaged ({why}); delete it to fall back to an older one")

    if not isinstance(meta, dict):
        raise bad("not a JSON object")
    for key, typ in {**_META_TYPES, **_META_OPTIONAL}.items():
        if key not in meta:
            if key in _META_TYPES:
                raise bad(f"no '{key}'")
            continue
        if not isinstance(meta[key], typ) or (typ is int and isinstance(meta[key], bool)):
            raise bad(f"'{key}' has the wrong type")
    if meta["tensors"] != json_path.with_suffix(".safetensors").name:
        raise bad(f"its tensor file '{meta['tensors']}' is not {json_path.stem}.safetensors")
    why = _shape_mismatch(meta)
    if why:
        raise bad(why)


MAX_SIDE = 4096  # the largest image side a checkpoint may claim (samples are allocated from it)
MAX_CLASSES = 1_000_000


def _shape_mismatch(meta: dict) -> str | None:
    """Why the image shape or class names disagree with each other and with the network that the weights
    are checked against when loaded (its input channels, image size and class count), or None."""
    shape, net, names = meta.get("image_shape"), meta.get("network") or {}, meta.get("class_names")
    if shape is not None:
        if len(shape) != 3 or not all(type(v) is int and 1 <= v <= MAX_SIDE for v in shape) or shape[0] > 4:
            return f"image_shape {shape} is not [channels 1-4, height, width] with sides up to {MAX_SIDE}"
        size = net.get("image_size")
        if net.get("in_channels") not in (None, shape[0]) or (type(size) is int and size != shape[1]) or \
                (isinstance(size, list) and size != shape[1:]):
            return f"image_shape {shape} is not the shape its network was built for"
    if names is not None:
        if len(names) > MAX_CLASSES or not all(isinstance(n, str) for n in names):
            return f"class_names is not a list of at most {MAX_CLASSES:,} names"
        classes = net.get("num_classes")
        if type(classes) is int and len(names) != classes:
            return f"it names {len(names):,} classes for a network of {classes}"
    return None


def verify_checkpoint(json_path: str | Path) -> bool:
    """True when the checkpoint's JSON parses and its tensor file matches the recorded SHA-256."""
    try:
        _verified(Path(json_path))
    except CheckpointError:
        return False
    return True


def load_checkpoint(json_path: str | Path, device: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], dict]:
    """Read one checkpoint, verifying its checksum. Raises CheckpointError with a one-line reason."""
    meta, st = _verified(Path(json_path))
    try:
        tensors = load_file(str(st), device=str(device))
    except Exception as e:  # any failure to parse means a corrupt file
        raise CheckpointError(f"checkpoint {st} cannot be read ({e}); delete it to use an older one") from e
    return tensors, meta


def latest_checkpoint(folder: str | Path, device: str | torch.device = "cpu"):
    """The newest checkpoint, verified, or None when the folder holds none. A corrupt newest
    checkpoint is an error (never silently skipped: the user decides); the message names the
    newest older one that verifies."""
    found = list_checkpoints(folder)
    if not found:
        return None
    try:
        return load_checkpoint(found[-1], device)
    except CheckpointError as e:
        good = next((p for p in reversed(found[:-1]) if verify_checkpoint(p)), None)
        older = f"the newest one that verifies is {good.stem}" if good else "no older one verifies"
        raise CheckpointError(f"{e} ({older})") from e


def optimizer_to_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Flatten an optimiser's state into tensors (for safetensors) and JSON-able hyper-parameters."""
    sd = opt.state_dict()
    tensors = {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            tensors[f"{idx}.{key}"] = torch.as_tensor(value)
    return tensors, {"param_groups": sd["param_groups"]}


def optimizer_from_tensors(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Restore what ``optimizer_to_tensors`` saved. Per-parameter state takes its parameter's memory format
    (safetensors stores dense row-major tensors): fused AdamW reads state and parameter as one flat
    buffer, so a channels-last weight with row-major moments would mix up its elements."""
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    if state:  # every parameter has the same state entries (or the optimiser fails at its next step)
        params = [i for g in meta["param_groups"] for i in g["params"]]
        keys = set(next(iter(state.values())))
        missing = next((i for i in params if set(state.get(i, {})) != keys), None)
        if missing is not None:
            raise ValueError(f"optimiser state of parameter {missing} is missing or incomplete")
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    for group in opt.param_groups:
        for p in group["params"]:
            for key, value in opt.state.get(p, {}).items():
                if isinstance(value, torch.Tensor) and value.shape == p.shape and value.stride() != p.stride():
                    opt.state[p][key] = torch.empty_like(p, dtype=value.dtype).copy_(value)
