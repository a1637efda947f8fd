"""Networks. Every one has the call

``net(x [B,C,H,W], t float [B], class_labels int64 [B] | None, context [B,L,D] | None,
context_mask bool [B,L] | None) -> [B, out_channels, H, W]``

and a JSON-serialisable ``net.config`` (constructor arguments plus ``"kind"``) that ``build`` inverts.
``t`` is the network time: the step index 0..T for discrete models, 1000 * t for continuous ones.
Class label ``num_classes`` is the null label; an all-False ``context_mask`` row is the null prompt.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import nn

from ..errors import UsageError
from .coordconv import CoordConvUNet
from .layout import match_layout
from .presets import PRESETS, diffusers_twin_kwargs
from .unet import UNet

__all__ = [
    "PRESETS", "CoordConvUNet", "UNet", "build", "count_parameters", "diffusers_twin_kwargs", "from_preset",
    "match_layout", "register",
]  # fmt: skip

_KINDS: dict[str, type[nn.Module]] = {"unet": UNet, "coordconv_unet": CoordConvUNet}

M = TypeVar("M", bound=type[nn.Module])


def register(kind: str) -> Callable[[M], M]:
    """Class decorator: make ``build({"kind": kind, ...})`` construct this network class.

    A module ``difflab/nets/<kind>.py`` is imported on first use of ``kind``, so it may register itself.
    """

    def decorate(cls: M) -> M:
        _KINDS[kind] = cls
        return cls

    return decorate


def build(config: dict[str, Any]) -> nn.Module:
    """Construct a network from its ``config`` (as stored in ``net.config``); the inverse of ``.config``."""
    config = dict(config)
    kind = config.pop("kind", None)
    module = f"{__name__}.{kind}"
    if (
        kind not in _KINDS
        and isinstance(kind, str)
        and kind.isidentifier()
        and importlib.util.find_spec(module)
    ):
        importlib.import_module(module)
    if kind not in _KINDS:
        raise UsageError(f"unknown network kind {kind!r}; known kinds: {', '.join(sorted(_KINDS))}")
    cls = _KINDS[kind]
    allowed = set(inspect.signature(cls).parameters)
    unknown = sorted(set(config) - allowed)
    if unknown:
        raise UsageError(
            f"unknown {kind} setting(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}"
        )
    return cls(**config)


def from_preset(name: str, **overrides: Any) -> nn.Module:
    """Build the preset ``name`` (see ``PRESETS``), with constructor arguments replaced by ``overrides``."""
    if name not in PRESETS:
        raise UsageError(f"unknown network preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return build({**PRESETS[name], **overrides})


def count_parameters(net: nn.Module) -> int:
    """The number of parameters (each shared tensor counted once)."""
    return sum(p.numel() for p in net.parameters())


def split_prefix(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries under ``prefix.`` with the prefix removed."""
    n = len(prefix) + 1
    return {k[n:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
