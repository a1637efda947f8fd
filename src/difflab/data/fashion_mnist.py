"""Fashion-MNIST from the Debian package ``dataset-fashion-mnist`` (no download).

The package puts the four idx files of the original release (``train-images-idx3-ubyte.gz``,
...) in /usr/share/datasets/fashion-mnist. ``$DIFFLAB_FASHION_MNIST`` may point at another folder
holding the same files (gzipped or not), for systems without Debian packages.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

from difflab.data import cache
from difflab.data.imagedata import fingerprint
from difflab.errors import DataError

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
CLASS_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
               "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
          "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def data_dir() -> Path:
    """The folder with the idx files: ``$DIFFLAB_FASHION_MNIST`` or the Debian package's folder."""
    env = os.environ.get("DIFFLAB_FASHION_MNIST")
    return Path(env).expanduser() if env else DEBIAN_DIR


def _find(folder: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    raise DataError(f"Fashion-MNIST not found ({folder / stem}.gz is missing): "
                    f"apt-get install dataset-fashion-mnist, or set DIFFLAB_FASHION_MNIST to a folder "
                    f"holding its idx files")


def read_idx(path: Path) -> np.ndarray:
    """An idx file (big-endian header: magic 0x0000 08 <ndim>, then ndim uint32 sizes) as uint8."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[:3] != b"\x00\x00\x08":
        raise DataError(f"{path} is not an unsigned-byte idx file; reinstall dataset-fashion-mnist")
    ndim = raw[3]
    shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    data = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise DataError(f"{path} is truncated ({data.size} of {int(np.prod(shape))} bytes); "
                        f"reinstall dataset-fashion-mnist")
    return data.reshape(shape)


def _decode(paths: dict[str, tuple[Path, Path]]) -> dict[str, dict[str, np.ndarray]]:
    out = {}
    for split, (image_file, label_file) in paths.items():
        images = read_idx(image_file)[:, None].copy()  # [N, 1, 28, 28], writable
        labels = read_idx(label_file).astype(np.int64)
        if images.ndim != 4 or len(images) != len(labels):
            raise DataError(f"{image_file} and {label_file} do not match; reinstall dataset-fashion-mnist")
        out[split] = {"images": images, "labels": labels,
                      "fingerprint": np.array(fingerprint(images, labels))}
    return out


def load_fashion_mnist(split: str = "train", cache_dir: str | Path | None = None) -> dict[str, np.ndarray]:
    """Fashion-MNIST ``split`` ("train": 60k, "test": 10k) as {"images" uint8 [N,1,28,28], "labels", ...}."""
    folder = data_dir()
    paths = {s: (_find(folder, img), _find(folder, lab)) for s, (img, lab) in _FILES.items()}
    key = cache.source_key(*(cache.file_stamp(p) for pair in paths.values() for p in pair))
    return cache.cached_splits(cache_dir, "fashion-mnist", key, split, lambda: _decode(paths))
