"""Process-wide CPU settings that difflab applies when it trains or samples on a CPU.

- Denormal floats are flushed to zero: zero-initialised layers produce denormal activations and
  gradients early in training, several times slower on x86 (mnist-small step 3.76 s -> 0.63 s).
- glibc's malloc keeps freed memory for reuse instead of returning every large block to the kernel:
  by default each activation over 128 KiB-32 MiB is a fresh ``mmap``, and its first touch costs a page
  fault per 4 KiB (with two threads, unmapping also costs TLB shoot-downs). DDIM-10 sampling of mnist-small,
  bf16, one thread, batch 32 went from 80 to 107 img/s on the 2-core CI machine. The price is memory
  that stays with the process once used (its peak, as with jemalloc or tcmalloc).

Set ``DIFFLAB_TUNE_MALLOC=0`` to leave malloc alone.
"""

from __future__ import annotations

import ctypes
import os
import platform

import torch

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_done: dict[str, bool] = {}


def tune_malloc() -> bool:
    """Make glibc malloc keep freed blocks (mmap threshold 32 MiB, no trimming below 1 GiB); True if set."""
    if "malloc" not in _done:
        ok = False
        if os.environ.get("DIFFLAB_TUNE_MALLOC", "1") != "0" and platform.system() == "Linux" \
                and platform.libc_ver()[0] == "glibc":
            try:
                libc = ctypes.CDLL(None)
                ok = bool(libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30))
            except (OSError, AttributeError):
                ok = False
        _done["malloc"] = ok
    return _done["malloc"]


def tune_cpu() -> None:
    """Flush denormals and tune malloc (see the module notes); safe to call many times."""
    torch.set_flush_denormal(True)
    tune_malloc()
