"""Features and statistics of reference (real) data, computed once per dataset and extractor.

Cached as ``<cache>/refstats-<name>-<fingerprint>-<extractor>.npz`` in the cache folder of
``difflab.data`` (``cache_dir``, else ``$DIFFLAB_CACHE``, else ``~/.cache/difflab``). The features
are rounded to float32 (the networks compute in float32, so nothing is lost), mu and sigma are
float64. Files are read with ``allow_pickle=False`` and written atomically.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from difflab.evaluate.metrics import feature_stats

Extractor = Callable[[Any], np.ndarray]


def _safe(text: str, limit: int = 40) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in text)[:limit]


def cache_path(dataset, extractor: Extractor, cache_dir: str | Path | None = None) -> Path:
    """Where the statistics of ``dataset`` (an ``ImageData``) under ``extractor`` are cached."""
    from difflab.data import cache

    name = getattr(extractor, "name", type(extractor).__name__)
    return cache.cache_root(cache_dir) / f"refstats-{_safe(Path(dataset.name).name)}-{dataset.fingerprint}-{_safe(name, 80)}.npz"


def reference_stats(
    dataset,
    split: str = "train",
    extractor: Extractor | None = None,
    *,
    cache_dir: str | Path | None = None,
    limit: int | None = None,
) -> dict[str, np.ndarray]:
    """dict(mu [D] float64, sigma [D, D] float64, features [N, D] float64) of a reference dataset.

    ``dataset`` is a name for ``difflab.data.load(name, split=split)`` or an ``ImageData`` (then
    ``split`` is ignored). ``extractor`` maps uint8 images to features and has a ``name``
    (default: ``InceptionFeatures()``). ``limit`` keeps the first ``limit`` images. The cache key
    is the data fingerprint plus the extractor name, so changed data or weights never reuse stale
    statistics.
    """
    from difflab.data import cache

    if isinstance(dataset, str):
        from difflab.data import load

        dataset = load(dataset, split=split)
    if limit is not None and limit < len(dataset):
        dataset = dataset.subset(limit)
    if extractor is None:
        from difflab.evaluate.inception import InceptionFeatures

        extractor = InceptionFeatures()
    path = cache_path(dataset, extractor, cache_dir)
    hit = cache.read(path)
    if hit is not None and {"mu", "sigma", "features"} <= hit.keys():
        return {"mu": hit["mu"], "sigma": hit["sigma"], "features": hit["features"].astype(np.float64)}
    # rounded to float32 first, so that a cache hit returns exactly what a miss does
    features = np.asarray(extractor(dataset.images), dtype=np.float32)
    mu, sigma = feature_stats(features)
    cache.write(path, {"mu": mu, "sigma": sigma, "features": features})
    return {"mu": mu, "sigma": sigma, "features": features.astype(np.float64)}

