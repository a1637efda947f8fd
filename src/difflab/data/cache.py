"""Decoded datasets cached as uncompressed .npz files, so a second load takes milliseconds.

The cache folder is ``cache_dir`` if given, else ``$DIFFLAB_CACHE``, else ``~/.cache/difflab``.
Files are written under a temporary name and renamed, so concurrent processes (several ranks
decoding at once) never read a half-written file. A cache that cannot be written is not an error:
the data is simply decoded again next time.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from difflab.files import OutputError, atomic_write

log = logging.getLogger(__name__)

# Bump when the decoders change what they produce: old cache files are then ignored.
FORMAT_VERSION = 1


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """The folder that holds decoded datasets."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("DIFFLAB_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "difflab"


def source_key(*parts: object) -> str:
    """A short hash of the things a cached file depends on (source file stats, settings)."""
    text = repr((FORMAT_VERSION, *parts))
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def file_stamp(path: Path) -> tuple[str, int, int]:
    """(path, size, mtime in ns): changes when the file is replaced or upgraded."""
    st = path.stat()
    return str(path.resolve()), st.st_size, st.st_mtime_ns


def read(path: Path) -> dict[str, np.ndarray] | None:
    """The arrays of a cache file, or None when it is missing or unreadable."""
    try:
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    except FileNotFoundError:
        return None
    except (OSError, ValueError, EOFError) as e:  # truncated or foreign file: decode again
        log.debug("ignoring unreadable cache file %s: %s", path, e)
        return None


def write(path: Path, arrays: dict[str, np.ndarray], stale: str | None = None) -> None:
    """Write ``arrays`` atomically to ``path``; remove files matching the glob ``stale`` first."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if stale:
            for old in path.parent.glob(stale):
                if old != path:
                    old.unlink(missing_ok=True)
        def fill(tmp: Path) -> None:
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)

        atomic_write(path, fill)
    except (OSError, OutputError) as e:
        log.warning("could not cache decoded data in %s (%s); it will be decoded again next time", path, e)


def cached_splits(
    cache_dir: str | Path | None,
    prefix: str,
    key: str,
    split: str,
    decode: Callable[[], dict[str, dict[str, np.ndarray]]],
) -> dict[str, np.ndarray]:
    """Arrays of one split from ``<cache>/<prefix>-<key>-<split>.npz``, calling ``decode()`` on a miss.

    ``decode`` returns every split at once ({split: {"images", "labels", "fingerprint"}}), since
    the sources here (one pickle, one folder of idx files) are read whole anyway. Files of the
    same prefix with another key (an older source) are removed when the new ones are written.
    """
    root = cache_root(cache_dir)
    hit = read(root / f"{prefix}-{key}-{split}.npz")
    if hit is not None:
        return hit
    splits = decode()
    for name, arrays in splits.items():
        write(root / f"{prefix}-{key}-{name}.npz", arrays, stale=f"{prefix}-*-{name}.npz")
    return splits[split]
