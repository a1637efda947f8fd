"""Images given in memory (``difflab.train(data=images, labels=...)``): a tensor, a numpy array or a list of
PIL images as an :class:`~difflab.data.ImageData`.

The rule, one line per case (anything else is a one-line :class:`~difflab.errors.UsageError`):

- shape: [N, H, W] (gray), [N, C, H, W] when dimension 1 is 1 or 3, [N, H, W, C] when the last one is;
  square images, 1 (gray) or 3 (RGB) channels, at least one image;
- values: uint8 (or any integer type) are pixels 0..255; floats are [0, 1] when none is below 0, else
  [-1, 1] (the model's own scale); NaN, infinities and other ranges are refused;
- PIL images: all of one size; gray when every one is, else RGB (transparency onto white, as a folder's);
- labels: one whole number >= 0 per image; label k is class k (class names "0", "1", ...).

A run trained on such images records them by their fingerprint (:func:`memory_name`, its ``--data``): the run
samples without them, and resumes only with the same images and labels.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from difflab.data.imagedata import ImageData, fingerprint
from difflab.errors import UsageError

PREFIX = "in-memory:"  # the --data of a run trained on images given in memory, before their fingerprint


def memory_name(print_: str) -> str:
    """The data name of in-memory images with fingerprint ``print_`` (what config.json records as ``data``)."""
    return PREFIX + print_


def from_memory(images: Any, labels: Any = None, *, image_size: int | None = None, channels: int | None = None,
                multiple: int = 1) -> ImageData:
    """``images`` (and ``labels``) by the module's rule as uint8 data, resized to ``image_size`` (without it:
    up to a multiple of ``multiple`` pixels) and turned to ``channels`` when given; its name is
    :func:`memory_name` of its fingerprint."""
    from difflab.data import transforms

    pixels = _pixels(images)
    n, _, h, w = pixels.shape
    if h != w:
        raise UsageError(f"images must be square, got {h}x{w} (height x width): crop them first")
    if not image_size and h % multiple:
        image_size = -(-h // multiple) * multiple
    transforms.check_settings(image_size, channels, None)
    pixels = transforms.apply(pixels, image_size, channels, None)
    classes = _labels(labels, n)
    names = None if classes is None else [str(k) for k in range(int(classes.max()) + 1)]
    print_ = fingerprint(pixels, classes)
    return ImageData(pixels, classes, names, memory_name(print_), print_)


def _pixels(images: Any) -> torch.Tensor:
    """uint8 [N, C, H, W] of the images, by the module's rule."""
    if isinstance(images, (list, tuple)):
        return torch.from_numpy(_pil_pixels(images))
    if isinstance(images, torch.Tensor):
        t = images.detach().cpu()
        images = (t.float() if t.is_floating_point() else t).numpy()  # (numpy has no bfloat16)
    if not isinstance(images, np.ndarray):
        raise UsageError(f"data= takes a dataset name, a folder, or images (a tensor, numpy array or list of PIL "
                         f"images), got {type(images).__name__}")
    a = _layout(images)
    return torch.from_numpy(np.ascontiguousarray(_scaled(a)))


def _layout(a: np.ndarray) -> np.ndarray:
    """[N, C, H, W] of an [N, H, W], [N, C, H, W] or [N, H, W, C] array."""
    shape = list(a.shape)
    if a.ndim == 3:
        a = a[:, None]
    elif a.ndim == 4:
        first, last = shape[1] in (1, 3), shape[3] in (1, 3)
        if first and last:
            raise UsageError(f"images {shape} are ambiguous: dimension 1 and the last could each be the channels; "
                             "pass images larger than 3x3")
        if last:
            a = a.transpose(0, 3, 1, 2)
        elif not first:
            raise UsageError(f"images need 1 (gray) or 3 (RGB) channels, got {shape} (channels in dimension 1 "
                             "or last)")
    else:
        raise UsageError(f"images must be [N, H, W], [N, C, H, W] or [N, H, W, C], got {a.ndim} dimensions {shape}")
    if len(a) == 0 or a.size == 0:
        raise UsageError(f"data= holds no images (shape {shape})")
    return a


def _scaled(a: np.ndarray) -> np.ndarray:
    """uint8 pixels of integer (0..255) or float ([0, 1] or [-1, 1]) images."""
    if a.dtype == np.uint8:
        return a
    if a.dtype.kind in "iu":
        lo, hi = int(a.min()), int(a.max())
        if lo < 0 or hi > 255:
            raise UsageError(f"integer images must be pixels 0..255, got values from {lo} to {hi}")
        return a.astype(np.uint8)
    if a.dtype.kind != "f":
        raise UsageError(f"images must be integers 0..255 or floats in [0, 1] or [-1, 1], got {a.dtype}")
    x = a.astype(np.float32) if a.itemsize < 4 else a  # (half precision would round the pixels badly)
    if not np.isfinite(x).all():
        raise UsageError("images hold NaN or infinite values")
    lo, hi = float(x.min()), float(x.max())
    if lo >= 0 and hi <= 1:
        x = x * 255
    elif lo >= -1 and hi <= 1:
        x = (x + 1) * 127.5
    else:
        raise UsageError(f"float images must be in [0, 1] or [-1, 1], got values from {lo:g} to {hi:g} (pixels "
                         "0..255: pass uint8 or divide by 255)")
    return np.rint(x).astype(np.uint8)


def _pil_pixels(images: Sequence[Any]) -> np.ndarray:
    """uint8 [N, C, H, W] of a list of same-sized PIL images (gray when all are)."""
    from difflab.data.folder import _convert, _is_gray

    if not images:
        raise UsageError("data= holds no images (an empty list)")
    if not all(isinstance(im, Image.Image) for im in images):
        bad = next(type(im).__name__ for im in images if not isinstance(im, Image.Image))
        raise UsageError(f"a list given as data= must hold PIL images, got a {bad} (stack arrays into one)")
    sizes = {im.size for im in images}
    if len(sizes) > 1:
        a, b = sorted(sizes)[:2]
        raise UsageError(f"the PIL images must all be one size, got {a[0]}x{a[1]} and {b[0]}x{b[1]}")
    channels = 1 if all(_is_gray(im) for im in images) else 3
    arrays = [np.asarray(_convert(im, channels), dtype=np.uint8) for im in images]
    a = np.stack(arrays)
    return a[:, None] if channels == 1 else a.transpose(0, 3, 1, 2).copy()


def _labels(labels: Any, n: int) -> torch.Tensor | None:
    """int64 [n] class labels (whole numbers >= 0), or None."""
    if labels is None:
        return None
    a = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if a.dtype.kind not in "iu" or a.shape != (n,):
        raise UsageError(f"labels must be one whole number per image ({n}), got {a.dtype} {list(a.shape)}")
    if n and int(a.min()) < 0:
        raise UsageError(f"labels must be class numbers >= 0, got {int(a.min())}")
    return torch.from_numpy(a.astype(np.int64))
