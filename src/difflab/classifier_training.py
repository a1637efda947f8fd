"""Training the noisy classifier that classifier guidance differentiates (part 5): a run folder of
``--method noisy-classifier`` trained by the one Trainer, then its accuracy on noisy test images.

Above both the Trainer and :mod:`difflab.runs.classifier` (which loads and uses a classifier), so
that sampling, which loads classifiers, never imports the Trainer through it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from difflab.config import TrainConfig, channel_widths, load_run_config, save_json
from difflab.data import ImageData
from difflab.errors import DataError, UsageError
from difflab.methods.classification import NOISY_WIDTHS, held_out_split
from difflab.methods.method import method_class
from difflab.recipe import build_config
from difflab.runs.classifier import ACCURACY, KIND, load_classifier, noisy_accuracy
from difflab.training.trainer import Trainer

# the settings a classifier takes from the diffusion run it will guide (``run=``), or from the caller (``data=``)
DATA_SETTINGS = ("data", "process", "T", "gamma", "image_size", "image_channels")


@dataclass
class ClassifierResult:
    """What ``train_classifier_run`` did: steps, wall time, where the weights are, noisy accuracy."""

    step: int
    seconds: float
    checkpoint: Path | None
    accuracy: list[dict[str, float]]  # [{"sigma": VE noise level, "t": process time, "accuracy": ...}]
    stopped_by: str  # "steps", "time-limit" or "signal" (then no accuracy is measured)
    signal: int = 0


def classifier_run_config(out: str | Path, *, run: str | Path | None = None, data: str | None = None,
                          model_channels: int | None = None, **settings: Any) -> TrainConfig:
    """The config of a noisy classifier run into ``out``: ``difflab train --method noisy-classifier`` of the
    same settings (:func:`difflab.recipe.build_config`; the classifier defaults are ``recipe.METHOD_DEFAULTS``'),
    on the data and Gaussian process of diffusion run ``run`` or on ``data`` with the ``settings`` given.
    ``model_channels``: the width of the first level, the others scaled as in ``NOISY_WIDTHS``."""
    if (run is None) == (data is None):
        raise UsageError("give exactly one of --run DIFFUSION_RUN_DIR or --data NAME")
    if run is not None:
        clash = sorted(set(settings) & set(DATA_SETTINGS))
        if clash:
            raise UsageError(f"--{clash[0].replace('_', '-')} goes with --data: a classifier of --run {run} trains "
                             "on that run's data and process")
        cfg = load_run_config(run)
        if not method_class(cfg.method).denoises:
            raise UsageError(f"classifier guidance needs a Gaussian diffusion run; {run} is {cfg.method}")
        settings = {**settings, **{name: getattr(cfg, name) for name in DATA_SETTINGS}}
    else:
        settings = {**settings, "data": data}
    if model_channels is not None:
        if model_channels < 1:
            raise UsageError(f"--channels must be at least 1, got {model_channels}")
        widths = channel_widths(NOISY_WIDTHS)
        settings["channels_mult"] = ",".join(str(model_channels * w // widths[0]) for w in widths)
    return build_config({**settings, "method": KIND, "out": str(out)})


def _splits(cfg: TrainConfig) -> tuple[ImageData, ImageData]:
    from difflab.runs.data import load_data

    train = load_data(cfg)
    try:
        test = load_data(cfg, split="test")
    except DataError:
        test = None
    return held_out_split(train, test, cfg.seed)


def train_classifier_run(out: str | Path, *, run: str | Path | None = None, data: str | None = None,
                         model_channels: int | None = None, eval_n: int = 2000, resume: bool = False,
                         progress: bool = False, log: Callable[[str], Any] = print, **settings: Any) -> ClassifierResult:
    """Train a noisy classifier into run folder ``out`` (:func:`classifier_run_config`: on the data and Gaussian
    process of diffusion run ``run``, or on ``data``; ``settings`` are TrainConfig's fields, e.g. ``steps``,
    ``batch_size``, ``process``) and report its accuracy (:func:`fit_classifier`)."""
    cfg = classifier_run_config(out, run=run, data=data, model_channels=model_channels, **settings)
    return fit_classifier(cfg, eval_n=eval_n, resume=resume, progress=progress, log=log)


def fit_classifier(cfg: TrainConfig, *, eval_n: int = 2000, resume: bool = False, progress: bool = False,
                   log: Callable[[str], Any] = print) -> ClassifierResult:
    """Train the noisy classifier of ``cfg`` (a ``noisy-classifier`` config): the Trainer with its method
    (cross-entropy on z_t, t drawn like diffusion training; the run lock, checks of ``out``, checkpoints,
    signals, the time limit and ``resume`` are the Trainer's).

    Stops after ``steps`` or ``time_limit`` minutes, saves, measures the accuracy on ``eval_n`` noisy
    test images at each of ``REPORT_SIGMAS`` and writes it to ``out/accuracy.json``."""
    if eval_n < 1:
        raise UsageError(f"--eval-n must be at least 1, got {eval_n}")
    train, test = _splits(cfg)
    trainer = Trainer(cfg, resume=resume, progress=progress, log=log, data=train)
    result = trainer.run()
    accuracy: list[dict[str, float]] = []
    if result.stopped_by != "signal":  # a signal asks for a quick exit
        classifier = load_classifier(trainer.out, trainer.device)
        accuracy = noisy_accuracy(classifier, test.images[:eval_n], test.labels[:eval_n], seed=cfg.seed)
        save_json(trainer.out / ACCURACY, {"step": result.step, "test_images": min(eval_n, len(test)),
                                           "accuracy": accuracy})
    return ClassifierResult(result.step, result.seconds, result.checkpoint, accuracy, result.stopped_by,
                            result.signal)
