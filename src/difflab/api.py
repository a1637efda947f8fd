"""The Python API: ``difflab.train(...)`` and ``difflab.load(path)``, the same runs and images as the
``difflab train`` and ``difflab sample`` commands.

>>> import difflab
>>> model = difflab.train(data="digits", model="tiny", steps=20, out="runs/api")  # doctest: +SKIP
>>> images = model.sample(8, seed=0, steps=10)         # uint8 [8, C, H, W]; pil=True: PIL images
"""

from __future__ import annotations

import os
from dataclasses import fields
from typing import Any

from difflab.checks import check_device, check_flag
from difflab.errors import UsageError
from difflab.model import Model, load, to_pil

__all__ = ["Model", "load", "to_pil", "train"]


def train(*, resume: bool = False, progress: bool = False, device: str | None = None, **settings: Any) -> Model:
    """Train a run and return it loaded (:class:`Model`, EMA weights, on the training device).

    ``settings`` are the fields of :class:`~difflab.config.TrainConfig`, the ``difflab train`` flags with
    ``_`` for ``-`` (``data="digits"``, ``method="naive1"``, ``steps=200``, ``out="runs/x"``); the settings not
    given get the method's reference settings exactly as on the command line
    (:func:`~difflab.config.config_from_values`). ``resume``: continue the latest checkpoint in ``out``."""
    from difflab.config import config_from_values
    from difflab.evaluate import during_training
    from difflab.training.trainer import Trainer

    settings = {k: os.fspath(v) if isinstance(v, os.PathLike) else v for k, v in settings.items()}  # out=Path(...)
    check_settings(settings, resume=resume, progress=progress, device=device)
    cfg = config_from_values({**settings, "device": device})
    trainer = Trainer(cfg, resume=resume, progress=progress, log=print if progress else _quiet,
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


def _quiet(*_args, **_kwargs) -> None:
    """The trainer's log when ``progress`` is off: nothing."""
