"""Training: one loop for every method (trainer), what is trained (methods), atomic safetensors
checkpoints, the EMA of the weights, and PyTorch's distributed engine."""

import sys
import types


class _TrainPackage(types.ModuleType):
    """``difflab.train`` names both this package and the API's :func:`difflab.api.train`; Python binds the
    package to the attribute once anything under it is imported, so the package itself trains when called."""

    def __call__(self, **settings):
        """``difflab.train(data="digits", steps=200, ...)``: see :func:`difflab.api.train`."""
        from difflab.api import train

        return train(**settings)


sys.modules[__name__].__class__ = _TrainPackage
