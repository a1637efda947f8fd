"""The Python API: ``difflab.train(...)`` and ``difflab.load(path)``, the same runs and images as the
``difflab train`` and ``difflab sample`` commands.

>>> import difflab
>>> model = difflab.train(data="digits", model="tiny", steps=20, out="runs/api")  # doctest: +SKIP
>>> model = difflab.train(data=images, labels=classes, model="tiny", steps=20, out="runs/mine")  # doctest: +SKIP
>>> images = model.sample(8, seed=0, steps=10)         # uint8 [8, C, H, W]; pil=True: PIL images
"""

from __future__ import annotations

import os
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from difflab.checks import check_device, check_flag
from difflab.data.memory import PREFIX, from_memory
from difflab.errors import UsageError
from difflab.model import Model, load, to_pil

if TYPE_CHECKING:
    from difflab.config import TrainConfig
    from difflab.data import ImageData

__all__ = ["Model", "load", "to_pil", "train"]


def train(*, resume: bool = False, progress: bool = True, device: str | None = None, **settings: Any) -> Model:
    """Train a run and return it loaded (:class:`Model`, EMA weights, on the training device).

    ``settings`` are the fields of :class:`~difflab.config.TrainConfig`, the ``difflab train`` flags with
    ``_`` for ``-`` (``data="digits"``, ``method="naive1"``, ``steps=200``, ``out="runs/x"``); the settings not
    given get the method's reference settings exactly as on the command line
    (:func:`~difflab.recipe.build_config`). ``resume``: continue the latest checkpoint in ``out``.

    ``data`` may also be images in memory: a tensor or numpy array ([N, H, W], [N, C, H, W] or [N, H, W, C];
    uint8 0..255, or floats in [0, 1] or [-1, 1]) or a list of PIL images, with ``labels`` their classes (one
    whole number each), as :mod:`difflab.data.memory` reads them; sizes not a multiple of 8 are resized up, as a
    folder's. The run records their fingerprint: it samples without them, and resumes only with the same ones.

    ``progress`` (default on): the run's description and a progress bar with the step, loss, images/s and the
    time left (tqdm; a widget in Jupyter when ipywidgets is installed); ``progress=False`` trains silently."""
    from difflab.evaluate import during_training
    from difflab.recipe import build_config
    from difflab.training.trainer import Trainer

    settings = {k: os.fspath(v) if isinstance(v, os.PathLike) else v for k, v in settings.items()}  # out=Path(...)
    images = None
    if not isinstance(settings.get("data", ""), (str, type(None))):  # images (their reader says what it takes)
        images, labels = settings.pop("data"), settings.pop("labels", None)
    elif settings.get("labels") is not None and not isinstance(settings["labels"], bool):
        raise UsageError("labels= as a list of classes goes with images given as data= (a tensor, array or PIL "
                         "images); with a folder, labels=True reads its sub-folders as classes")
    check_settings(settings, resume=resume, progress=progress, device=device)
    if images is not None:
        images = _in_memory(images, labels, settings)
        settings["data"] = images.name
    given = {**settings, **({"device": device} if device is not None else {})}
    cfg = build_config(given)
    if images is not None:
        _check_in_memory(cfg)
    if resume:
        _check_resumed_data(cfg, images is not None)
    trainer = Trainer(cfg, resume=resume, given=given, progress=progress, log=print if progress else _quiet, data=images,
                      evaluation=during_training.plan)
    trainer.run()
    trainer.dist.shutdown()
    return load(trainer.out, trainer.device)


def check_settings(settings: dict[str, Any], *, resume: object, progress: object, device: object) -> None:
    """What ``train`` is given, as the command line would check its flags: booleans, a device, each setting
    of its field's type, and None only where None is the field's own default (``data=None`` is not MNIST)."""
    from difflab.config import TrainConfig

    check_flag("resume", resume)
    check_flag("progress", progress)
    if device is not None:
        check_device(device)
    defaults = {f.name: f.default for f in fields(TrainConfig)}
    for name, value in settings.items():
        if value is None and defaults.get(name, None) is not None:
            raise UsageError(f"{name}=None: leave {name} out for its default ({defaults[name]!r}) or give a value")
    try:
        TrainConfig.check_types({k: v for k, v in settings.items() if v is not None})
    except TypeError as e:
        raise UsageError(f"difflab.train: {str(e)[:200]} (the settings are the 'difflab train' flags' values, "
                         "e.g. channels_mult=\"16,32\")") from None


def _in_memory(images: Any, labels: Any, settings: dict[str, Any]) -> ImageData:
    """The images given as ``data``, sized as a folder's would be: ``image_size`` and ``image_channels`` when
    given, else resized up to a multiple of the run layer's ``SIZE_MULTIPLE``."""
    from difflab.runs.data import SIZE_MULTIPLE

    return from_memory(images, labels, image_size=settings.get("image_size") or None,
                       channels=settings.get("image_channels") or None, multiple=SIZE_MULTIPLE)


def _check_in_memory(cfg: TrainConfig) -> None:
    """What a run on in-memory images cannot do: reload them later (a method that samples from its data) or
    decode them larger (``crop``)."""
    from difflab.methods.method import METHOD_CLASSES

    if METHOD_CLASSES[cfg.method].samples_from_data:
        raise UsageError(f"method '{cfg.method}' samples from its training images, which a run on images in memory "
                         "cannot reload: save them to a folder and pass data=FOLDER")
    if cfg.crop:
        raise UsageError("crop decodes the images larger, which needs them on disk: save them to a folder and pass "
                         "data=FOLDER, or resize them yourself")


def _check_resumed_data(cfg: TrainConfig, in_memory: bool) -> None:
    """A run trained on images in memory resumes only with the same images (the same fingerprint)."""
    from difflab.config import load_run_config

    out = Path(cfg.out)
    if not (out / "config.json").exists():
        return
    saved = load_run_config(out).data
    if saved == cfg.data or not saved.startswith(PREFIX):
        return  # (a different dataset or folder is the trainer's own one-line error)
    if not in_memory:
        raise UsageError(f"{out} trained on images given in memory ({saved}): pass the same images (and labels) "
                         "as data= to resume it")
    raise UsageError(f"these images ({cfg.data}) are not the ones {out} trained on ({saved}): pass the same images "
                     "and labels to resume it")


def _quiet(*_args, **_kwargs) -> None:
    """The trainer's log when ``progress`` is off: nothing."""
