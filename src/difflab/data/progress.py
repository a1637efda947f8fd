"""Progress bars for slow data work (indexing, decoding, packing), on stderr."""

from __future__ import annotations

import sys


def progress(iterable=None, total: int | None = None, desc: str = "", unit: str = "image"):
    """A tqdm bar on stderr that shows only when the work takes more than a second."""
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=unit, delay=1.0, mininterval=0.5, file=sys.stderr,
                dynamic_ncols=True)
