"""KID or FID of a run's EMA samples every ``--eval-every`` steps, against Inception features of its training
data computed once per data fingerprint (the reference cache of :mod:`difflab.evaluate.reference`).

``--eval-every -1`` (auto) turns it on only when its estimated cost, measured at the start (one Inception batch,
one network call), is at most :data:`BUDGET_SHARE` of the run's budget (``--time-limit``, else the steps at
the measured speed); the run's first lines say which and why.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import numpy as np
import torch

from difflab.data.imagedata import ImageData
from difflab.errors import UsageError
from difflab.evaluate.inception import InceptionFeatures, missing_weights
from difflab.evaluate.metrics import feature_stats, frechet_distance, kid
from difflab.evaluate.reference import cache_path, reference_stats

AUTO = -1
BUDGET_SHARE = 0.05  # the most of a run's time that auto lets evaluation take
AUTO_EVALUATIONS = 10  # evaluations over a run when auto turns them on
REFERENCE_N = 2048  # training images in the reference (the first ones; fewer when the data has fewer)


def make_extractor(device: torch.device) -> InceptionFeatures:
    """The Inception features of the evaluations (tests replace this with a cheap extractor)."""
    return InceptionFeatures(device=device, precision="auto")


class TrainingEval:
    """Callable ``(step) -> value``: ``metric`` (kid or fid) of ``n`` samples that ``draw(n, seed)``
    returns (uint8 [n, C, H, W]), against the reference features of ``reference`` (an ``ImageData``)."""

    def __init__(self, every: int, metric: str, n: int, reference, extractor, draw: Callable[[int, int], torch.Tensor]):
        self.every, self.metric, self.n = every, metric, n
        self.reference, self.extractor, self.draw = reference, extractor, draw
        self._ref: dict | None = None

    def due(self, step: int) -> bool:
        return step % self.every == 0

    def __call__(self, step: int) -> float:
        if self._ref is None:  # computed (or read from the cache) at the first evaluation, not at start-up
            self._ref = reference_stats(self.reference, extractor=self.extractor)
        # the same seeds every time, so the curve follows the weights, not the draw
        fake = self.extractor(self.draw(self.n, 0)).astype(np.float32).astype(np.float64)
        if self.metric == "fid":
            return frechet_distance(self._ref["mu"], self._ref["sigma"], *feature_stats(fake))
        size = min(len(fake), len(self._ref["features"]), 1000)
        return kid(self._ref["features"], fake, subsets=10, subset_size=size, seed=step)[0]


def plan(cfg, data, device: torch.device, draw: Callable[[int, int], torch.Tensor],
         step_seconds: Callable[[], float]) -> tuple[TrainingEval | None, str]:
    """(the evaluator or None, the line the run starts with saying which and why). ``cfg``: the run's
    TrainConfig (eval_every, eval_metric, eval_n, steps, time_limit); ``data``: its training data (any
    :class:`~difflab.data.source.ImageSource`); ``step_seconds()``: a measure of one training step.
    An explicit ``--eval-every`` without the Inception weights is a UsageError (before training)."""
    if cfg.eval_every == 0:
        return None, ""
    problem = missing_weights()
    if problem is not None:
        if cfg.eval_every != AUTO:
            raise UsageError(f"--eval-every {cfg.eval_every}: {problem}")
        return None, f"evaluation: off ({problem})"
    n = min(len(data), REFERENCE_N)  # the first images of any source, streamed or in memory
    reference = ImageData(data.read(np.arange(n)), None, None, data.name)
    if cfg.eval_every != AUTO:
        return (TrainingEval(cfg.eval_every, cfg.eval_metric, cfg.eval_n, reference, make_extractor(device), draw),
                f"evaluation: {cfg.eval_metric.upper()} of {cfg.eval_n} samples every {cfg.eval_every} steps")
    step_s = step_seconds()
    steps = cfg.steps if not cfg.time_limit else min(cfg.steps, max(1, int(cfg.time_limit * 60 / step_s)))
    budget = cfg.time_limit * 60 if cfg.time_limit else steps * step_s
    every = max(1, math.ceil(steps / AUTO_EVALUATIONS))
    count = steps // every
    # the sampling alone first: when it is over budget, the Inception network is not even loaded
    (cost,) = _seconds_for(lambda k: draw(k, 0), cfg.eval_n)
    extractor, once = None, 0.0
    if cost * count <= BUDGET_SHARE * budget:
        extractor = make_extractor(device)
        shape = tuple(reference.images.shape[1:])
        each_eval, reference_once = _seconds_for(lambda k: extractor(torch.zeros(k, *shape, dtype=torch.uint8)),
                                                 cfg.eval_n, len(reference))
        cost += each_eval
        once = 0.0 if cache_path(reference, extractor).exists() else reference_once
    total = cost * count + once
    each = f"about {cost:.0f} s each" if extractor is not None else f"their sampling alone about {cost:.0f} s each"
    why = (f"{count} evaluations of {cfg.eval_n} samples, {each}, {total / 60:.1f} min in all against a budget of "
           f"{budget / 60:.1f} min")
    if extractor is None or total > BUDGET_SHARE * budget:
        return None, (f"evaluation: off ({why}: more than {BUDGET_SHARE:.0%}; turn it on with --eval-every N, or "
                      f"make it cheaper with a smaller --eval-n)")
    return (TrainingEval(every, cfg.eval_metric, cfg.eval_n, reference, extractor, draw),
            f"evaluation: {cfg.eval_metric.upper()} every {every} steps ({why})")


def _seconds_for(work: Callable[[int], object], *counts: int, small: int = 2, large: int = 8) -> list[float]:
    """Seconds ``work(n)`` will take for each n of ``counts``, from two timed calls of ``small`` and ``large``
    images after a warm-up: a fixed cost plus one per image, so a call's own overheads are not counted once per
    image (a CPU draws a batch of 256 much faster per image than a batch of 2)."""
    work(small)
    start = time.perf_counter()
    work(small)
    t_small = time.perf_counter() - start
    start = time.perf_counter()
    work(large)
    per_image = max(time.perf_counter() - start - t_small, 0.0) / (large - small)
    fixed = max(t_small - per_image * small, 0.0)
    return [fixed + per_image * n for n in counts]

