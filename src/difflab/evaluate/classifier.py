"""A small CNN classifier on clean images: the accuracy of class-conditional samples, and the
features of the fast "classifier FID" (its 128-d penultimate layer instead of Inception's 2048-d).

This is not the noisy, time-conditioned classifier of classifier guidance
(``difflab.runs.classifier``): it sees clean uint8 images only. It is trained by the one Trainer
(``--method classifier``, ``difflab.methods.classification``), and a trained one is cached as that
run folder (checksummed safetensors + JSON checkpoints, never pickle) under
``<cache>/classifier-<name>-<fingerprint>-<settings>/``, keyed by the fingerprint of the training
data, so each dataset is trained once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from difflab.config import save_json
from difflab.data import ImageData, to_model
from difflab.errors import CheckpointError, DataError, UsageError
from difflab.evaluate.inception import check_images
from difflab.files import OutputError
from difflab.methods.classification import held_out_split, trained_network
from difflab.nets.small_cnn import FEATURE_DIM, SmallCNN
from difflab.recipe import build_config
from difflab.runs.checkpoint import latest_checkpoint

log = logging.getLogger(__name__)

FORMAT = "difflab-image-classifier"
VERSION = 2  # 2: trained by the Trainer, cached as a run folder
INFO = "accuracy.json"  # beside the run's checkpoints: the key, the data and the test accuracy


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
    return torch.cat([model(to_model(images[i:i + batch_size], device)).argmax(1).cpu()
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
    out: str | Path | None = None,
) -> tuple[SmallCNN, float]:
    """Train a SmallCNN on uint8 images [N, C, H, W] with int64 labels; return (model, test accuracy).

    The Trainer with ``--method classifier`` into run folder ``out`` (None: a temporary one): AdamW
    without weight decay, a linear warm-up over 30% of the steps then a cosine decay (a one-cycle
    schedule), no augmentation. ``epochs=None`` takes enough epochs for about 900 steps (2 at least,
    30 at most): 2 for MNIST, 30 for small sets. Without a test set, a seeded 10% of the data is held
    out for the accuracy. Deterministic for a given seed and device. MNIST (60k, 2 epochs) takes about
    a minute on 2 CPU cores and reaches ~99% test accuracy.
    """
    images = check_images(images)
    labels = torch.as_tensor(labels).long()
    if len(labels) != len(images):
        raise UsageError(f"{len(images)} images but {len(labels)} labels")
    if len(images) < 10:
        raise UsageError(f"training a classifier needs at least 10 labelled images, got {len(images)}")
    if test_images is not None and test_labels is None:
        raise UsageError("test_images given without test_labels")
    names = [str(c) for c in range(num_classes)]
    train = ImageData(images, labels, names, "images")
    test = None if test_images is None else ImageData(check_images(test_images), torch.as_tensor(test_labels).long(),
                                                      names, "test images")
    train, test = held_out_split(train, test, seed)
    if out is None:
        with tempfile.TemporaryDirectory(prefix="difflab-classifier-") as tmp:
            return train_classifier(train.images, train.labels, num_classes, epochs, seed, device,
                                    test_images=test.images, test_labels=test.labels, batch_size=batch_size,
                                    lr=lr, out=Path(tmp) / "run")
    steps_per_epoch = math.ceil(len(train) / batch_size)
    if epochs is None:
        epochs = min(30, max(2, -(-900 // steps_per_epoch)))
    steps = max(1, epochs * steps_per_epoch)
    cfg = build_config(dict(method="classifier", data=train.name, out=str(out), steps=steps, batch_size=batch_size,
                            lr=lr, weight_decay=0.0, warmup=max(1, round(0.3 * steps)), lr_decay="cosine",
                            seed=seed, device=str(device), checkpoint_every=steps, keep=1, log_every=min(50, steps)))
    from difflab.training.trainer import Trainer

    with torch.random.fork_rng(devices=[]):  # the caller's random state is left alone
        Trainer(cfg, progress=False, log=lambda *_: None, data=train).run()
    model = load_image_classifier(out, device)
    return model, accuracy_of_samples(model, test.images, test.labels)


def load_image_classifier(run_dir: str | Path, device: str | torch.device = "cpu") -> SmallCNN:
    """The SmallCNN of a ``--method classifier`` run folder (its latest verified checkpoint)."""
    found = latest_checkpoint(Path(run_dir) / "checkpoints", device)
    if found is None or (found[1].get("config") or {}).get("method") != "classifier":
        raise CheckpointError(f"'{run_dir}' holds no trained image classifier")
    return trained_network(*found, str(run_dir), device)


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
            x = to_model(images[i:i + self.batch_size], device)
            out[i:i + len(x)] = self.model.penultimate(x).double().cpu().numpy()
        return out


def _load_cached(entry: Path, device: torch.device) -> tuple[SmallCNN, dict] | None:
    """The cached classifier run ``entry`` and its metadata, or None (missing, partial, damaged, older)."""
    try:
        meta = json.loads((entry / INFO).read_text())
        if meta.get("format") != FORMAT or meta.get("version") != VERSION:
            return None
        return load_image_classifier(entry, device), meta
    except (OSError, ValueError, CheckpointError):  # train again
        return None


def _publish(run: Path, entry: Path) -> None:
    """Move a trained classifier run into the cache as ``entry``, replacing a damaged or partial one
    (the cache's own folder: nothing else is ever there)."""
    if entry.exists():
        shutil.rmtree(entry)
    run.rename(entry)


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
    accuracy). The cache entry ``<cache>/classifier-<name>-<fingerprint>-<settings>/`` is the run
    folder the Trainer wrote (trained under a temporary name, then renamed into place), with
    ``accuracy.json`` (written last). ``metadata["key"]`` names the weights,
    ``metadata["test_accuracy"]`` is the held-out accuracy. ``load_options`` (image_size, channels,
    pad_to) go to ``difflab.data.load``.
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
    entry = root / key
    device = torch.device(device)
    hit = _load_cached(entry, device)
    if hit is not None:
        return hit
    try:
        root.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{key[:40]}-", dir=root))
    except OSError as e:  # a read-only cache is not an error: train again next time
        log.warning("could not cache the classifier in %s (%s); it will be trained again", root, e)
        work = Path(tempfile.mkdtemp(prefix="difflab-classifier-"))
    try:
        start = time.perf_counter()
        model, accuracy = train_classifier(
            train.images, train.labels, train.num_classes, epochs, seed, device, out=work / "run",
            test_images=None if test is None else test.images, test_labels=None if test is None else test.labels)
        meta = {"format": FORMAT, "version": VERSION, "key": key, "config": model.config, "data": name,
                "fingerprint": train.fingerprint, "test_fingerprint": test.fingerprint if test else None,
                "test_accuracy": accuracy, "held_out": "test split" if test else "10% of the data",
                "epochs": epochs, "seed": seed, "train_seconds": round(time.perf_counter() - start, 1)}
        if verbose:
            print(f"classifier for {name}: test accuracy {accuracy:.4f} in {meta['train_seconds']} s")
        if work.parent == root:
            try:
                save_json(work / "run" / INFO, meta)
                _publish(work / "run", entry)
            except (OSError, OutputError) as e:  # another process published it first, or the disk is full
                log.warning("could not cache the classifier in %s (%s)", entry, e)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return model, meta
