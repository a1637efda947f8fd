"""Training the noisy classifier that classifier guidance differentiates (part 5): a run folder of
``--method noisy-classifier`` trained by the one Trainer, then its accuracy on noisy test images.

Above both the Trainer and :mod:`difflab.runs.classifier` (which loads and uses a classifier), so
that sampling, which loads classifiers, never imports the Trainer through it."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from difflab.config import TrainConfig, load_run_config, save_json
from difflab.data import ImageData
from difflab.errors import DataError, UsageError
from difflab.methods.classification import classifier_config, held_out_split
from difflab.methods.method import method_class
from difflab.runs.classifier import ACCURACY, KIND, load_classifier, noisy_accuracy
from difflab.training.trainer import Trainer


@dataclass
class ClassifierResult:
    """What ``train_classifier_run`` did: steps, wall time, where the weights are, noisy accuracy."""

    step: int
    seconds: float
    checkpoint: Path | None
    accuracy: list[dict[str, float]]  # [{"sigma": VE noise level, "t": process time, "accuracy": ...}]
    stopped_by: str  # "steps", "time-limit" or "signal" (then no accuracy is measured)
    signal: int = 0


def _data_config(run: str | Path | None, data: str | None, process: str, T: int, gamma: float,
                 image_size: int, image_channels: int) -> dict[str, Any]:
    """The data and process settings: a diffusion run's own, or the given ones."""
    if (run is None) == (data is None):
        raise UsageError("give exactly one of --run DIFFUSION_RUN_DIR or --data NAME")
    if run is not None:
        cfg = load_run_config(run)
        if not method_class(cfg.method).denoises:
            raise UsageError(f"classifier guidance needs a Gaussian diffusion run; {run} is {cfg.method}")
        data, process, T, gamma = cfg.data, cfg.process, cfg.T, cfg.gamma
        image_size, image_channels = cfg.image_size, cfg.image_channels
    return {"data": data, "process": process, "T": T, "gamma": gamma, "image_size": image_size,
            "image_channels": image_channels}


def _splits(cfg: TrainConfig) -> tuple[ImageData, ImageData]:
    from difflab.runs.data import load_data

    train = load_data(cfg)
    try:
        test = load_data(cfg, split="test")
    except DataError:
        test = None
    return held_out_split(train, test, cfg.seed)


def train_classifier_run(
    out: str | Path,
    *,
    run: str | Path | None = None,
    data: str | None = None,
    process: str = "linear",
    T: int = 1000,
    gamma: float = 0.9,
    image_size: int = 0,
    image_channels: int = 0,
    steps: int = 2000,
    time_limit: float = 0.0,
    batch_size: int = 128,
    lr: float = 1e-3,
    weight_decay: float = 0.05,
    warmup: int = 100,
    model_channels: int = 32,
    channel_mult: Sequence[int] = (1, 2, 2),
    seed: int = 0,
    device: str = "auto",
    eval_n: int = 2000,
    checkpoint_every: int = 1000,
    resume: bool = False,
    progress: bool = False,
    log: Callable[[str], Any] = print,
) -> ClassifierResult:
    """Train a noisy classifier into run folder ``out`` on the data and Gaussian process of diffusion run
    ``run`` (or on ``data`` with ``process``): the Trainer with ``--method noisy-classifier``
    (cross-entropy on z_t, t drawn like diffusion training; the run lock, checks of ``out``, checkpoints,
    signals, the time limit and ``resume`` are the Trainer's).

    Stops after ``steps`` or ``time_limit`` minutes, saves, measures the accuracy on ``eval_n`` noisy
    test images at each of ``REPORT_SIGMAS`` and writes it to ``out/accuracy.json``."""
    for name, v in {"eval_n": eval_n, "model_channels": model_channels}.items():
        if v < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {v}")
    if not 0 < lr < 1:
        raise UsageError(f"--lr must be in (0, 1), got {lr}")
    widths = ",".join(str(model_channels * m) for m in channel_mult)
    cfg = classifier_config(method=KIND, out=str(out), **_data_config(run, data, process, T, gamma, image_size,
                            image_channels), steps=steps, time_limit=time_limit, batch_size=batch_size, lr=lr,
                            weight_decay=weight_decay, warmup=warmup, channels_mult=widths, seed=seed,
                            device=device, checkpoint_every=checkpoint_every, keep=2)
    train, test = _splits(cfg)
    trainer = Trainer(cfg, resume=resume, progress=progress, log=log, data=train)
    result = trainer.run()
    accuracy: list[dict[str, float]] = []
    if result.stopped_by != "signal":  # a signal asks for a quick exit
        classifier = load_classifier(trainer.out, trainer.device)
        accuracy = noisy_accuracy(classifier, test.images[:eval_n], test.labels[:eval_n], seed=seed)
        save_json(trainer.out / ACCURACY, {"step": result.step, "test_images": min(eval_n, len(test)),
                                           "accuracy": accuracy})
    return ClassifierResult(result.step, result.seconds, result.checkpoint, accuracy, result.stopped_by,
                            result.signal)

