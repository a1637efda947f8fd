"""A small CNN classifier on clean images: the accuracy of class-conditional samples, and the
features of the fast "classifier FID" (its 128-d penultimate layer instead of Inception's 2048-d).

This is not the noisy, time-conditioned classifier of classifier guidance (``difflab.nets``): it
sees clean uint8 images only. Trained weights are cached as safetensors + JSON (never pickle),
keyed by the fingerprint of the training data, so each dataset is trained once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from difflab.errors import DataError, UsageError
from difflab.evaluate.inception import check_images
from difflab.files import OutputError, atomic_write, write_text
from difflab.train.checkpoint import sha256_file

log = logging.getLogger(__name__)

FORMAT = "difflab-image-classifier"
VERSION = 1
FEATURE_DIM = 128


def _to_model(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    return images.to(device).float() / 127.5 - 1


def _check_size(model: SmallCNN, images: torch.Tensor) -> None:
    c, h, w = images.shape[1:]
    cfg = model.config
    if c != cfg["in_channels"] or [h, w] != cfg["image_size"]:
        raise UsageError(f"images are {c}x{h}x{w} but the classifier was trained on "
                         f"{cfg['in_channels']}x{cfg['image_size'][0]}x{cfg['image_size'][1]}; "
                         f"evaluate against reference data of the samples' size")


@torch.inference_mode()
def predict(model: SmallCNN, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Predicted labels int64 [N] of uint8 images [N, C, H, W]."""
    images = check_images(images)
    _check_size(model, images)
    model.eval()
    device = next(model.parameters()).device
    return torch.cat([model(_to_model(images[i:i + batch_size], device)).argmax(1).cpu()
                      for i in range(0, len(images), batch_size)]) if len(images) else torch.zeros(0).long()


def accuracy_of_samples(model: SmallCNN, images: torch.Tensor, labels: torch.Tensor,
                        batch_size: int = 512) -> float:
    """Fraction of uint8 images [N, C, H, W] that the classifier assigns to ``labels`` [N]."""
    labels = torch.as_tensor(labels).long().cpu()
    if len(labels) != len(images) or len(images) == 0:
        raise UsageError(f"need one label per image and at least one image, got {len(images)} images "
                         f"and {len(labels)} labels")
    return float((predict(model, images, batch_size) == labels).double().mean())


def train_classifier(
    images: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    epochs: int | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    *,
    test_images: torch.Tensor | None = None,
    test_labels: torch.Tensor | None = None,
    batch_size: int = 128,
    lr: float = 3e-3,
) -> tuple[SmallCNN, float]:
    """Train a SmallCNN on uint8 images [N, C, H, W] with int64 labels; return (model, test accuracy).

    Adam with a one-cycle learning-rate schedule, no augmentation. ``epochs=None`` takes enough
    epochs for about 900 steps (2 at least, 30 at most): 2 for MNIST, 30 for small sets. Without
    a test set, a seeded 10% of the data is held out for the accuracy. Deterministic for a given
    seed and device. MNIST (60k, 2 epochs) takes about a minute on 2 CPU cores and reaches ~99%
    test accuracy.
    """
    images = check_images(images)
    labels = torch.as_tensor(labels).long()
    if len(labels) != len(images):
        raise UsageError(f"{len(images)} images but {len(labels)} labels")
    if len(images) < 10:
        raise UsageError(f"training a classifier needs at least 10 labelled images, got {len(images)}")
    gen = torch.Generator().manual_seed(seed)
    if test_images is None:
        order = torch.randperm(len(images), generator=gen)
        n_test = max(1, len(images) // 10)
        test_images, test_labels = images[order[:n_test]], labels[order[:n_test]]
        images, labels = images[order[n_test:]], labels[order[n_test:]]
    elif test_labels is None:
        raise UsageError("test_images given without test_labels")
    device = torch.device(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SmallCNN(images.shape[1], num_classes, tuple(images.shape[2:])).to(device)
    steps_per_epoch = (len(images) + batch_size - 1) // batch_size
    if epochs is None:
        epochs = min(30, max(2, -(-900 // steps_per_epoch)))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(1, epochs * steps_per_epoch))
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(images), generator=gen)
        for i in range(0, len(images), batch_size):
            idx = order[i:i + batch_size]
            if len(idx) < 2:  # batch norm needs two samples
                continue
            loss = F.cross_entropy(model(_to_model(images[idx], device)), labels[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    return model, accuracy_of_samples(model, test_images, torch.as_tensor(test_labels))


class ClassifierFeatures:
    """Callable feature extractor: uint8 images -> float64 numpy [N, 128] penultimate features.

    ``name`` ("classifier-<key>") ties cached reference statistics to these exact weights.
    """

    def __init__(self, model: SmallCNN, name: str = "classifier", batch_size: int = 512):
        self.model = model.eval()
        self.name = name
        self.dim = FEATURE_DIM
        self.batch_size = batch_size

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor | np.ndarray) -> np.ndarray:
        images = check_images(images)
        _check_size(self.model, images)
        device = next(self.model.parameters()).device
        out = np.empty((len(images), self.dim), dtype=np.float64)
        for i in range(0, len(images), self.batch_size):
            x = _to_model(images[i:i + self.batch_size], device)
            out[i:i + len(x)] = self.model.penultimate(x).double().cpu().numpy()
        return out


def _load_cached(stem: Path, device: torch.device) -> tuple[SmallCNN, dict] | None:
    from safetensors.torch import load_file

    meta_path, weights_path = stem.with_suffix(".json"), stem.with_suffix(".safetensors")
    try:
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != FORMAT or meta.get("version") != VERSION:
            return None
        if sha256_file(weights_path) != meta["sha256"]:
            return None
        cfg = meta["config"]
        model = SmallCNN(cfg["in_channels"], cfg["num_classes"], tuple(cfg["image_size"]))
        model.load_state_dict(load_file(str(weights_path)))
    except (OSError, ValueError, KeyError, RuntimeError):  # missing, partial or foreign: train again
        return None
    return model.to(device).eval(), meta


def load_or_train_classifier(
    data,
    cache_dir: str | Path | None = None,
    *,
    epochs: int | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    verbose: bool = False,
    **load_options,
) -> tuple[SmallCNN, dict]:
    """The classifier of a dataset, trained once and cached; returns (model, metadata).

    ``data`` is a dataset name for ``difflab.data.load`` (trained on split "train", accuracy on
    split "test" when the dataset has one) or an ``ImageData`` (a seeded 10% held out for the
    accuracy). Files: ``<cache>/classifier-<name>-<fingerprint>-<settings>.safetensors`` and
    ``.json`` (config, test accuracy, the weights' SHA-256; written last). ``metadata["key"]``
    names the weights, ``metadata["test_accuracy"]`` is the held-out accuracy. ``load_options``
    (image_size, channels, pad_to) go to ``difflab.data.load``.
    """
    from difflab.data.cache import cache_root

    test = None
    if isinstance(data, str):
        from difflab.data import load

        name, train = data, load(data, split="train", **load_options)
        try:
            test = load(data, split="test", **load_options)
        except DataError:
            test = None
        if test is not None and test.fingerprint == train.fingerprint:  # a folder without test/
            test = None
    else:
        name, train = data.name, data
    if train.labels is None:
        raise UsageError(f"the classifier needs labelled data, and {name} has no labels")
    settings = hashlib.sha1(repr((VERSION, epochs, seed, test.fingerprint if test else None)).encode())
    safe_name = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in Path(name).name)[:40]
    key = f"classifier-{safe_name}-{train.fingerprint}-{settings.hexdigest()[:8]}"
    root = cache_root(cache_dir)
    stem = root / key
    device = torch.device(device)
    hit = _load_cached(stem, device)
    if hit is not None:
        return hit
    num_classes = train.num_classes
    start = time.perf_counter()
    model, accuracy = train_classifier(
        train.images, train.labels, num_classes, epochs, seed, device,
        test_images=None if test is None else test.images, test_labels=None if test is None else test.labels)
    meta = {"format": FORMAT, "version": VERSION, "key": key, "config": model.config, "data": name,
            "fingerprint": train.fingerprint, "test_fingerprint": test.fingerprint if test else None,
            "test_accuracy": accuracy, "held_out": "test split" if test else "10% of the data",
            "epochs": epochs, "seed": seed, "train_seconds": round(time.perf_counter() - start, 1)}
    if verbose:
        print(f"classifier for {name}: test accuracy {accuracy:.4f} in {meta['train_seconds']} s")
    try:
        from safetensors.torch import save_file

        root.mkdir(parents=True, exist_ok=True)
        weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        atomic_write(stem.with_suffix(".safetensors"), lambda p: save_file(weights, str(p)))
        meta["sha256"] = sha256_file(stem.with_suffix(".safetensors"))
        write_text(stem.with_suffix(".json"), json.dumps(meta, indent=1))
    except (OSError, OutputError) as e:  # a read-only cache is not an error: train again next time
        log.warning("could not cache the classifier in %s (%s); it will be trained again", root, e)
    return model, meta
