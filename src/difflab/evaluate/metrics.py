"""Sample-quality metrics on feature vectors: FID, KID, precision and recall.

Every function takes features as arrays [N, D] (numpy or torch), works in float64 and is
deterministic (KID draws its subsets from its own seeded generator).

- FID (Heusel et al. 2017): Frechet distance between Gaussians fitted to the two feature sets,
  ||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)).
- KID (Binkowski et al. 2018): unbiased MMD^2 with the kernel k(x, y) = (x.y / D + 1)^3,
  averaged over random subsets; unbiased, so it is meaningful for small sample counts.
- Precision and recall (Kynkaanniemi et al. 2019): each set's manifold is the union of balls
  around its points with radius the distance to the k-th nearest neighbour; precision is the
  fraction of fake points inside the real manifold, recall the fraction of real points inside the
  fake manifold.
"""

from __future__ import annotations

import numpy as np
import torch

Features = np.ndarray | torch.Tensor


def _features(x: Features, what: str = "features") -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"{what} must be [N >= 2, D], got shape {x.shape}")
    return x


def feature_stats(feats: Features) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and covariance [D, D] (unbiased, N - 1) of features [N, D], in float64."""
    x = _features(feats)
    mu = x.mean(axis=0)
    centred = x - mu
    return mu, centred.T @ centred / (len(x) - 1)


def _sqrt_psd(s: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric positive semi-definite matrix (eigenvalues < 0 -> 0)."""
    w, v = np.linalg.eigh((s + s.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Frechet (2-Wasserstein) distance squared between N(mu1, sigma1) and N(mu2, sigma2).

    tr((S1 S2)^(1/2)) is computed as the sum of square roots of the eigenvalues of the symmetric
    PSD matrix S1^(1/2) S2 S1^(1/2) (same eigenvalues as S1 S2), so no non-symmetric sqrtm is
    needed and the distance of a set to itself is 0 up to float64 rounding. Never negative.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"mismatched statistics: mu {mu1.shape} / {mu2.shape}, "
                         f"sigma {sigma1.shape} / {sigma2.shape}")
    root1 = _sqrt_psd(sigma1)
    middle = root1 @ sigma2 @ root1
    eig = np.linalg.eigvalsh((middle + middle.T) / 2)
    trace_sqrt = np.sqrt(np.clip(eig, 0, None)).sum()
    diff = mu1 - mu2
    value = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt
    return float(max(value, 0.0))


def fid(feats_a: Features, feats_b: Features) -> float:
    """Frechet Inception Distance between two feature sets [N, D] and [M, D]."""
    return frechet_distance(*feature_stats(feats_a), *feature_stats(feats_b))


def _mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    d = x.shape[1]
    kxx = (x @ x.T / d + 1) ** 3
    kyy = (y @ y.T / d + 1) ** 3
    kxy = (x @ y.T / d + 1) ** 3
    m, n = len(x), len(y)
    return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1))
                 + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
                 - 2 * kxy.mean())


def kid(feats_a: Features, feats_b: Features, subsets: int = 100, subset_size: int = 1000,
        seed: int = 0) -> tuple[float, float]:
    """Kernel Inception Distance: (mean, std) of the unbiased MMD^2 over ``subsets`` random subsets.

    Each subset takes ``min(subset_size, N, M)`` points of each set without replacement; the std
    is the population std (ddof 0) over subsets, as in torchmetrics. Same seed, same result.
    """
    a, b = _features(feats_a, "feats_a"), _features(feats_b, "feats_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sizes differ: {a.shape[1]} and {b.shape[1]}")
    size = min(subset_size, len(a), len(b))
    rng = np.random.default_rng(seed)
    values = np.array([
        _mmd2_unbiased(a[rng.choice(len(a), size, replace=False)], b[rng.choice(len(b), size, replace=False)])
        for _ in range(subsets)
    ])
    return float(values.mean()), float(values.std())


def _sq_dists(a: np.ndarray, b: np.ndarray, b_sq: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances [len(a), len(b)], clipped at 0."""
    d = (a * a).sum(axis=1)[:, None] + b_sq[None, :] - 2 * (a @ b.T)
    return np.maximum(d, 0, out=d)


def _knn_radii_sq(x: np.ndarray, k: int, chunk: int) -> np.ndarray:
    """Squared distance of each point to its k-th nearest other point (the point itself excluded)."""
    if len(x) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} points per set, got {len(x)}")
    x_sq = (x * x).sum(axis=1)
    radii = np.empty(len(x))
    for i in range(0, len(x), chunk):
        d = _sq_dists(x[i:i + chunk], x, x_sq)
        # position 0 of the sorted row is the point itself (distance 0), so take position k
        radii[i:i + chunk] = np.partition(d, k, axis=1)[:, k]
    return radii


def _coverage(points: np.ndarray, centres: np.ndarray, radii_sq: np.ndarray, chunk: int) -> float:
    """Fraction of ``points`` inside at least one ball (centre, radius) of the manifold."""
    c_sq = (centres * centres).sum(axis=1)
    inside = 0
    for i in range(0, len(points), chunk):
        d = _sq_dists(points[i:i + chunk], centres, c_sq)
        inside += int((d <= radii_sq[None, :]).any(axis=1).sum())
    return inside / len(points)


def precision_recall(real: Features, fake: Features, k: int = 3, chunk: int = 1024) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019) of ``fake`` against ``real``.

    Distances are computed ``chunk`` rows at a time, so memory is O(chunk * N): 10k x 10k
    features take about 80 MB at the default chunk.
    """
    r, f = _features(real, "real"), _features(fake, "fake")
    if r.shape[1] != f.shape[1]:
        raise ValueError(f"feature sizes differ: {r.shape[1]} and {f.shape[1]}")
    precision = _coverage(f, r, _knn_radii_sq(r, k, chunk), chunk)
    recall = _coverage(r, f, _knn_radii_sq(f, k, chunk), chunk)
    return precision, recall
