"""Evaluation that works offline: FID, KID, precision/recall and class accuracy of samples.

``evaluate_images`` is the one entry point; the pieces are importable on their own:
``metrics`` (fid, kid, precision_recall on feature arrays), ``inception`` (InceptionFeatures),
``classifier`` (a small CNN: accuracy of conditional samples, "classifier FID" features) and
``reference`` (cached reference statistics).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from difflab.errors import UsageError
from difflab.evaluate.classifier import (
    ClassifierFeatures,
    SmallCNN,
    accuracy_of_samples,
    load_or_train_classifier,
    train_classifier,
)
from difflab.evaluate.inception import InceptionFeatures, check_images, missing_weights
from difflab.evaluate.metrics import feature_stats, fid, frechet_distance, kid, precision_recall
from difflab.evaluate.reference import reference_stats

__all__ = [
    "METRICS", "ClassifierFeatures", "InceptionFeatures", "SmallCNN", "accuracy_of_samples", "check_evaluation",
    "evaluate_images", "feature_stats", "fid", "frechet_distance", "kid", "load_or_train_classifier",
    "precision_recall", "reference_stats", "train_classifier",
]

METRICS = ("fid", "kid", "precision", "recall", "accuracy")
OPTIONAL_METRICS = ("colour",)  # asked for by name only
FEATURES = ("inception", "classifier")
FID_MIN_SAMPLES = 10_000


def _weights_key(model: SmallCNN) -> str:
    h = hashlib.sha1()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return f"classifier-custom-{h.hexdigest()[:16]}"


def evaluate_images(
    fake: torch.Tensor,
    fake_labels: torch.Tensor | None,
    reference,
    metrics: Sequence[str] = METRICS,
    features: str = "inception",
    *,
    device: str | torch.device = "cpu",
    batch_size: int = 32,
    cache_dir: str | Path | None = None,
    classifier: SmallCNN | None = None,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    k: int = 3,
    seed: int = 0,
    progress: bool = False,
    inception_precision: str = "auto",
) -> dict[str, Any]:
    """Compare samples (uint8 [N, C, H, W]) with reference data (an ``ImageData``).

    metrics: any of "fid", "kid" (also gives "kid_std"), "precision", "recall" (Kynkaanniemi,
    k nearest neighbours), "accuracy" (how often the classifier of the reference data
    assigns each sample its ``fake_labels`` class) and "colour" (saturation, brightness and hue sixths against
    the reference's: :func:`difflab.evaluate.colour.compare`). features: "inception" (2048-d, comparable to
    published numbers) or "classifier" (128-d penultimate features of a small CNN trained on the
    reference data: fast on a CPU, comparable only within difflab). The classifier is trained on
    the reference data the first time (a seeded 10% held out) and cached, unless ``classifier``
    is given; reference features are cached too (see ``reference_stats``). ``inception_precision``: see
    ``InceptionFeatures`` (auto: bf16 on CPUs that compute it natively).

    Returns a JSON-serialisable dict: each requested metric under its plain name (None when it
    cannot be computed, with the reason in "warnings"), "n" (samples), "reference" (its name),
    "reference_n", "reference_fingerprint", "features" (the extractor's name) and "warnings"
    (a list of strings; FID from fewer than 10,000 samples is always flagged). Precision and
    recall use a seeded subset of the reference the size of the sample set.
    """
    fake = check_images(fake, "samples")
    label_max = None if fake_labels is None or not len(fake_labels) else int(torch.as_tensor(fake_labels).max())
    feature_metrics, warnings = check_evaluation(metrics, features, reference, len(fake), labels=fake_labels is not None,
                                                 label_max=label_max, classifier=classifier is not None)
    result: dict[str, Any] = {"n": len(fake), "reference": reference.name, "reference_n": len(reference),
                              "reference_fingerprint": reference.fingerprint}
    if tuple(fake.shape[1:]) != tuple(reference.images.shape[1:]):
        warnings.append(f"samples are {'x'.join(map(str, fake.shape[1:]))} but the reference images are "
                        f"{'x'.join(map(str, reference.images.shape[1:]))}")
    wants_accuracy = "accuracy" in metrics and fake_labels is not None and reference.labels is not None
    if "accuracy" in metrics and not wants_accuracy:
        result["accuracy"] = None
    needs_classifier = wants_accuracy or (features == "classifier" and bool(feature_metrics))
    model, classifier_name = _classifier(classifier, reference, needs_classifier, cache_dir, device, result)
    if wants_accuracy:
        result["accuracy"] = accuracy_of_samples(model, fake, torch.as_tensor(fake_labels))
    result["features"] = None
    if feature_metrics:
        if features == "inception":
            extractor = InceptionFeatures(device=device, batch_size=batch_size, progress=progress,
                                          precision=inception_precision)
        else:
            extractor = ClassifierFeatures(model, name=classifier_name)
        result["features"] = extractor.name
        ref = reference_stats(reference, extractor=extractor, cache_dir=cache_dir)
        # float32 like the cached reference features, so both sides are treated alike
        fake_feats = extractor(fake).astype(np.float32).astype(np.float64)
        result.update(_feature_metrics(ref, fake_feats, metrics, len(reference), warnings, kid_subsets,
                                       kid_subset_size, k, seed))
    if "colour" in metrics:
        from difflab.evaluate.colour import compare

        result["colour"] = compare(fake, reference.images)
    result["warnings"] = warnings
    return result


def check_evaluation(metrics: Sequence[str], features: str, reference, n: int, *, labels: bool,
                     label_max: int | None = None, classifier: bool = False) -> tuple[list[str], list[str]]:
    """Everything ``evaluate_images`` needs, checked before any sample is drawn: (the metrics computed from
    features, notes on the metrics that will be None). A UsageError names every missing piece in one line:
    unknown names, too few samples, the Inception weights, labelled reference data for classifier
    features (unless a ``classifier`` is given), sample labels (up to ``label_max``) outside its classes.
    ``labels``: whether the samples come with the classes they were drawn for."""
    unknown = [m for m in metrics if m not in METRICS + OPTIONAL_METRICS]
    if unknown:
        raise UsageError(f"unknown metric(s) {', '.join(unknown)}: choose from {', '.join(METRICS + OPTIONAL_METRICS)}")
    if features not in FEATURES:
        raise UsageError(f"unknown features '{features}': choose from {', '.join(FEATURES)}")
    feature_metrics = [m for m in metrics if m not in ("accuracy", *OPTIONAL_METRICS)]
    problems, notes = [], []
    if feature_metrics and n < 2:
        problems.append(f"{', '.join(feature_metrics)} need at least 2 samples, got {n}")
    if feature_metrics and features == "inception":
        problems.append(missing_weights())
    if feature_metrics and features == "classifier" and not classifier and reference.labels is None:
        problems.append(f"classifier features need labelled reference data, and {reference.name} has none: "
                        f"use features='inception'")
    classes = reference.num_classes
    if label_max is not None and classes is not None and label_max >= classes:
        problems.append(f"the samples' labels go up to {label_max} but {reference.name} has {classes} classes "
                        f"(0..{classes - 1}): evaluate against the data the samples were drawn for")
    problems = [p for p in problems if p]
    if problems:
        raise UsageError("; ".join(problems))
    if "accuracy" in metrics and not labels:
        notes.append("accuracy needs the class labels the samples were drawn for; none were given")
    elif "accuracy" in metrics and reference.labels is None:
        notes.append(f"accuracy needs labelled reference data, and {reference.name} has no labels")
    return feature_metrics, notes


def _classifier(given, reference, needed: bool, cache_dir, device, result: dict):
    """(classifier, its weights' key): the given one, else the reference data's (trained once, cached)
    when ``needed``; records the cached classifier's held-out accuracy in ``result``."""
    if given is not None:
        return given.to(device).eval(), _weights_key(given)
    if not needed:
        return None, None
    model, meta = load_or_train_classifier(reference, cache_dir, device=device)
    result["classifier_test_accuracy"] = meta["test_accuracy"]
    return model, meta["key"]


def _feature_metrics(ref: dict, fake_feats: np.ndarray, metrics: Sequence[str], reference_n: int,
                     warnings: list[str], kid_subsets: int, kid_subset_size: int, k: int, seed: int) -> dict:
    """FID, KID, precision and recall of sample features against the reference statistics ``ref``."""
    n, out = len(fake_feats), {}
    if "fid" in metrics:
        out["fid"] = frechet_distance(ref["mu"], ref["sigma"], *feature_stats(fake_feats))
        if n < FID_MIN_SAMPLES:
            warnings.append(f"FID from {n} < {FID_MIN_SAMPLES} samples is biased upwards; compare it only with "
                            f"FIDs computed from the same number of samples (KID is unbiased)")
    if "kid" in metrics:
        out["kid"], out["kid_std"] = kid(ref["features"], fake_feats, kid_subsets, kid_subset_size, seed)
        if min(n, reference_n) < kid_subset_size:
            warnings.append(f"KID subsets hold {min(n, reference_n)} samples, fewer than {kid_subset_size}")
    if "precision" in metrics or "recall" in metrics:
        real = ref["features"]
        if len(real) > n:
            real = real[np.sort(np.random.default_rng(seed).choice(len(real), n, replace=False))]
        if min(len(real), n) <= k:
            raise UsageError(f"precision/recall with k={k} need more than {k} samples, got {n}")
        precision, recall = precision_recall(real, fake_feats, k)
        out.update({m: v for m, v in (("precision", precision), ("recall", recall)) if m in metrics})
    return out
