"""difflab: diffusion models from naive pixel noise to guided text-to-image.

The package reads top-down in the order of the tutorial series:
part 1 naive diffusion (``processes.binomial``, ``processes.degradations``),
part 2 Gaussians (``gaussians``), part 3 DDPM (``processes.gaussian``),
part 4 DDIM and continuous time (``samplers``, ``processes.continuous``),
part 5 guidance (``guidance``).

In Python: ``difflab.train(data="digits", steps=200)`` and ``difflab.load("runs/demo").sample(16)`` (see
:mod:`difflab.api`).
"""

__version__ = "0.1.0"

__all__ = ["Model", "SampleRequest", "load", "to_pil", "train"]


def __getattr__(name: str):
    """``difflab.train``, ``difflab.load``, ``difflab.Model``, ``difflab.SampleRequest``: imported on first
    use, so that ``import difflab`` (and every command) does not load torch and the trainer up front."""
    if name == "SampleRequest":
        from difflab.runs.request import SampleRequest

        return SampleRequest
    if name in ("Model", "load", "to_pil", "train"):
        from difflab import api

        return getattr(api, name)
    raise AttributeError(f"module 'difflab' has no attribute {name!r}")
