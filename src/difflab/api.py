"""The Python API: ``difflab.train(...)`` and ``difflab.load(path)``, the same runs and images as the
``difflab train`` and ``difflab sample`` commands.

>>> import difflab
>>> model = difflab.train(data="digits", model="tiny", steps=20, out="runs/api")  # doctest: +SKIP
>>> images = model.sample(8, seed=0, steps=10)         # uint8 [8, C, H, W]; pil=True: PIL images
"""

from __future__ import annotations

from typing import Any

from difflab.model import Model, load, to_pil

__all__ = ["Model", "load", "to_pil", "train"]


def train(*, resume: bool = False, progress: bool = False, device: str | None = None, **settings: Any) -> Model:
    """Train a run and return it loaded (:class:`Model`, EMA weights, on the training device).

    ``settings`` are the fields of :class:`~difflab.config.TrainConfig`, the ``difflab train`` flags with
    ``_`` for ``-`` (``data="digits"``, ``method="naive1"``, ``steps=200``, ``out="runs/x"``); the settings not
    given get the method's reference settings exactly as on the command line
    (:func:`~difflab.config.config_from_values`). ``resume``: continue the latest checkpoint in ``out``."""
    from difflab.config import config_from_values
    from difflab.training.trainer import Trainer

    cfg = config_from_values({**settings, "device": device})
    trainer = Trainer(cfg, resume=resume, progress=progress, log=print if progress else _quiet)
    trainer.run()
    trainer.dist.shutdown()
    return load(trainer.out, trainer.device)


def _quiet(*_args, **_kwargs) -> None:
    """The trainer's log when ``progress`` is off: nothing."""
