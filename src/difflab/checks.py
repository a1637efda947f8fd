"""Checks of values where they enter difflab (flags, JSON files, arrays): one line each when wrong.

``check_range`` is the one test of a number (NaN, infinity, bounds); ``check_values`` applies it to a
table of ``name: (value, lo, hi)``; ``check_array`` tests a loaded .npy/.npz array's dtype, shape and
finiteness. Every failure is a :class:`~difflab.errors.UsageError` naming the flag.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping

import numpy as np

from difflab.errors import UsageError

MAX_SEED = 2**31 - 1  # seeds are mixed into int64 per-sample seeds as seed * 2**32
MAX_SAMPLES = 1_000_000  # images one command may draw or read (checked before anything is allocated)


def check_range(name: str, value: float | int | None, lo: float | None = None, hi: float | None = None, *,
                open_lo: bool = False, open_hi: bool = False, allow_inf: bool = False) -> None:
    """``value`` must be a finite number in [lo, hi] (``open_*``: the bound excluded; ``allow_inf``:
    +inf passes the upper bound check). None is accepted (a flag not given)."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UsageError(f"{name} must be a number, got {value!r}")
    if math.isnan(value) or (math.isinf(value) and not (allow_inf and value > 0)):
        raise UsageError(f"{name} must be a finite number, got {value}")
    low = lo is not None and (value <= lo if open_lo else value < lo)
    high = hi is not None and not math.isinf(value) and (value >= hi if open_hi else value > hi)
    if low or high:
        left = "(" if open_lo else "["
        right = ")" if open_hi else "]"
        span = f"{left}{'-inf' if lo is None else _num(lo)}, {'inf' if hi is None else _num(hi)}{right}"
        raise UsageError(f"{name} must be in {span}, got {_num(value)}")


def _num(v: float | int) -> str:
    return str(v) if isinstance(v, int) or abs(v) < 1e6 else f"{v:.3g}"


def check_values(table: Mapping[str, tuple]) -> None:
    """``check_range`` over ``{flag: (value, lo, hi[, options dict])}``."""
    for name, spec in table.items():
        value, lo, hi, *opts = spec
        check_range(name, value, lo, hi, **(opts[0] if opts else {}))


def check_array(name: str, arr: np.ndarray, *, kinds: str, ndim: int, finite: bool = True,
                shape: tuple | None = None) -> np.ndarray:
    """A loaded array of dtype kind in ``kinds`` ('f' float, 'u' unsigned, 'i' int), ``ndim`` axes,
    ``shape`` where given (None entries are free), and finite values; UsageError otherwise."""
    if arr.dtype.kind not in kinds or arr.dtype.hasobject:
        raise UsageError(f"{name} has dtype {arr.dtype}; expected {_kinds(kinds)}")
    if arr.ndim != ndim or (shape is not None and any(s is not None and s != a for s, a in zip(shape, arr.shape))):
        want = "x".join("N" if s is None else str(s) for s in shape) if shape else f"{ndim} axes"
        raise UsageError(f"{name} has shape {list(arr.shape)}; expected {want}")
    if finite and arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise UsageError(f"{name} holds NaN or infinite values")
    return arr


def _kinds(kinds: str) -> str:
    return " or ".join({"f": "float", "u": "unsigned integer", "i": "integer", "b": "bool"}[k] for k in kinds)


def check_whole(table: Mapping[str, tuple], optional: tuple[str, ...] = ()) -> None:
    """``{name: (value, lo, hi)}``: each value a whole number (not a bool, not 2.0) in [lo, hi]; None only
    for the names in ``optional``."""
    for name, (value, lo, hi) in table.items():
        if value is None and name in optional:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise UsageError(f"{name} must be a whole number, got {value!r}"[:200])
        check_range(name, int(value), lo, hi)


def check_flag(name: str, value: object) -> bool:
    """``value`` must be True or False (a string such as "no" would count as true)."""
    if not isinstance(value, bool):
        raise UsageError(f"{name} must be True or False, got {value!r}"[:200])
    return value


def check_path(name: str, value: object) -> str:
    """A file or folder name: a non-empty str or os.PathLike (None or a number is a mistake, not a default)."""
    if not isinstance(value, (str, os.PathLike)) or not str(os.fspath(value)).strip():
        raise UsageError(f"{name} must be a path (str or pathlib.Path), got {value!r}"[:200])
    return os.fspath(value)


DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d{1,3})?")  # what --device takes


def check_device(value: object, name: str = "device", auto: bool = True) -> str:
    """A device difflab runs on (cpu, mps, cuda, cuda:N, and ``auto`` where allowed), given as a str or a
    torch.device, and present on this machine: its name, else a UsageError."""
    text = str(value) if type(value).__name__ == "device" else value
    if not isinstance(text, str) or not DEVICE.fullmatch(text) or (text == "auto" and not auto):
        kinds = "auto, cpu, mps, cuda or cuda:N" if auto else "cpu, mps, cuda or cuda:N"
        raise UsageError(f"{name} must be {kinds}, got {value!r}"[:200])
    import torch

    if text.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"{name} {text} asked for, but torch sees no CUDA GPU (install a CUDA build of torch)")
    if text == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"{name} mps asked for, but this machine has no Apple GPU")
    return text
