"""scikit-learn's 8x8 handwritten digits (1797 images bundled with the library): for tiny tests."""

from __future__ import annotations

import numpy as np

from difflab.errors import DataError

CLASS_NAMES = [str(k) for k in range(10)]
TRAIN_SIZE = 1500  # the first 1500 images train, the other 297 test


def load_digits(split: str = "train") -> dict[str, np.ndarray]:
    """The digits ``split`` as {"images" uint8 [N,1,8,8] (0..16 scaled to 0..255), "labels" int64}."""
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError as e:
        raise DataError("the digits dataset needs scikit-learn: pip install scikit-learn") from e
    bunch = sklearn_digits()
    images = np.rint(bunch.images * (255 / 16)).clip(0, 255).astype(np.uint8)[:, None]
    labels = bunch.target.astype(np.int64)
    part = slice(0, TRAIN_SIZE) if split == "train" else slice(TRAIN_SIZE, None)
    return {"images": np.ascontiguousarray(images[part]), "labels": np.ascontiguousarray(labels[part])}
