"""ImageData: a dataset as uint8 tensors, plus the fingerprint that names its contents."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from difflab.data.source import count_classes
from difflab.errors import DataError


def fingerprint(images: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray | None = None) -> str:
    """First 16 hex digits of the SHA-1 of the images (uint8) and labels (int64), shapes included.

    Two datasets with the same fingerprint hold the same pixels and labels, so reference statistics
    (FID features, ...) computed on one can be reused for the other.
    """
    h = hashlib.sha1()
    for name, array in (("images", images), ("labels", labels)):
        if array is None:
            continue
        a = array.numpy() if isinstance(array, torch.Tensor) else array
        a = np.ascontiguousarray(a, dtype=np.uint8 if name == "images" else np.int64)
        h.update(f"{name}{a.shape}".encode())
        h.update(memoryview(a).cast("B"))
    return h.hexdigest()[:16]


def to_model(images: torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
    """uint8 pixels 0..255 as the float32 model scale [-1, 1] (``images / 127.5 - 1``), on ``device``;
    the inverse is :func:`difflab.figures.to_uint8`."""
    # one fresh float copy, scaled in place: as fast as the hand-written in-place form, never
    # touching ``images`` (``.float()`` alone returns float input itself)
    return images.to(device=device, dtype=torch.float32, copy=True).div_(127.5).sub_(1)


@dataclass
class ImageData:
    """A dataset in memory: ``images`` uint8 [N, C, H, W], ``labels`` int64 [N] or None; the in-memory
    :class:`difflab.data.source.ImageSource`.

    ``class_names[k]`` names label k; ``captions[i]`` (or None) describes image i; ``fingerprint``
    (computed when left empty) is a short hash of the pixels and labels, a cache key for statistics of
    this exact data.
    """

    images: torch.Tensor
    labels: torch.Tensor | None
    class_names: list[str] | None
    name: str
    fingerprint: str = ""
    captions: list[str] | None = None

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise ValueError(f"ImageData.images must be uint8 [N, C, H, W], got {self.images.dtype} "
                             f"{tuple(self.images.shape)}")
        if self.labels is not None and (self.labels.dtype != torch.int64 or self.labels.shape != (len(self),)):
            raise ValueError(f"ImageData.labels must be int64 [{len(self)}], got {self.labels.dtype} "
                             f"{tuple(self.labels.shape)}")
        if self.captions is not None and len(self.captions) != len(self):
            raise ValueError(f"ImageData.captions must hold one caption per image ({len(self)}), got {len(self.captions)}")
        if not self.fingerprint:
            self.fingerprint = fingerprint(self.images, self.labels)

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of one image."""
        c, h, w = self.images.shape[1:]
        return c, h, w

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    @property
    def height(self) -> int:
        return self.images.shape[2]

    @property
    def width(self) -> int:
        return self.images.shape[3]

    @property
    def num_classes(self) -> int | None:
        """Number of classes (labels run 0..num_classes-1); None for unlabelled data."""
        return count_classes(self.labels, self.class_names)

    def read(self, indices: Sequence[int] | torch.Tensor | np.ndarray) -> torch.Tensor:
        """The images at ``indices`` (in that order) as uint8 [B, C, H, W]."""
        return self.images[torch.as_tensor(indices, dtype=torch.int64)]

    def to_model(self, device: torch.device | str | None = None) -> torch.Tensor:
        """All images as floats in [-1, 1] (``images / 127.5 - 1``), on ``device``."""
        return to_model(self.images, device)

    def subset(self, n_or_indices: int | Sequence[int] | torch.Tensor | np.ndarray) -> ImageData:
        """The first ``n`` images, or the images at the given indices (in that order)."""
        if isinstance(n_or_indices, (int, np.integer)):
            n = int(n_or_indices)
            if not 0 <= n <= len(self):
                raise DataError(f"asked for {n} images but {self.name} holds {len(self)}")
            index: torch.Tensor | slice = slice(0, n)
        else:
            index = torch.as_tensor(np.asarray(n_or_indices), dtype=torch.int64).reshape(-1)
            if index.numel() and not (-len(self) <= int(index.min()) and int(index.max()) < len(self)):
                raise DataError(f"subset indices out of range for {self.name} ({len(self)} images)")
        if index == slice(0, len(self)):
            return ImageData(self.images, self.labels, self.class_names, self.name, self.fingerprint, self.captions)
        images = self.images[index].contiguous()
        labels = None if self.labels is None else self.labels[index].contiguous()
        captions = None
        if self.captions is not None:
            captions = self.captions[index] if isinstance(index, slice) else [self.captions[i] for i in index.tolist()]
        return ImageData(images, labels, self.class_names, self.name, captions=captions)
