"""Checks of values where they enter difflab (flags, JSON files, arrays): one line each when wrong.

``check_range`` is the one test of a number (NaN, infinity, bounds); ``check_values`` applies it to a
table of ``name: (value, lo, hi)``; ``check_array`` tests a loaded .npy/.npz array's dtype, shape and
finiteness. Every failure is a :class:`~difflab.errors.UsageError` naming the flag.
"""

from __future__ import annotations

import math
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
