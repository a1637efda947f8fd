"""ImageSource: a dataset read by index, in memory or streamed from disk.

:class:`difflab.data.ImageData` is the in-memory source; :class:`difflab.data.folder.FolderSource` and
:class:`difflab.data.shards.ShardSource` decode or map their images batch by batch. Code that needs only
what a dataset is (its shape, labels, class names, captions, fingerprint) takes any source; the trainer
reads its batches through :mod:`difflab.data.loader`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np
import torch

Indices = Sequence[int] | torch.Tensor | np.ndarray


@runtime_checkable
class ImageSource(Protocol):
    """A dataset of same-shaped uint8 images, read by index.

    ``labels`` (int64 [N], in memory) or None; ``class_names[k]`` names label k; ``captions[i]``
    describes image i (or None); ``fingerprint`` changes whenever the pixels or labels may have.
    """

    name: str
    fingerprint: str
    labels: torch.Tensor | None
    class_names: list[str] | None
    captions: list[str] | None

    def __len__(self) -> int: ...

    @property
    def shape(self) -> tuple[int, int, int]: ...

    @property
    def channels(self) -> int: ...

    @property
    def height(self) -> int: ...

    @property
    def width(self) -> int: ...

    @property
    def num_classes(self) -> int | None: ...

    def read(self, indices: Indices) -> torch.Tensor:
        """The images at ``indices`` (in that order) as uint8 [B, C, H, W]."""
        ...


class StreamedSource:
    """What a streamed source derives from its ``shape``, ``labels`` and ``class_names``; subclasses set
    those attributes and define ``__len__`` and ``read``."""

    name: str
    fingerprint: str
    labels: torch.Tensor | None
    class_names: list[str] | None
    captions: list[str] | None
    shape: tuple[int, int, int]

    @property
    def channels(self) -> int:
        return self.shape[0]

    @property
    def height(self) -> int:
        return self.shape[1]

    @property
    def width(self) -> int:
        return self.shape[2]

    @property
    def num_classes(self) -> int | None:
        """Number of classes (labels run 0..num_classes-1); None for unlabelled data."""
        return count_classes(self.labels, self.class_names)


def count_classes(labels: torch.Tensor | None, class_names: list[str] | None) -> int | None:
    """The number of classes of a source: its class names, else one past its largest label; None unlabelled."""
    if labels is None:
        return None
    if class_names is not None:
        return len(class_names)
    return int(labels.max()) + 1 if len(labels) else 0


def as_index(indices: Indices) -> np.ndarray:
    """``indices`` as a 1-d int64 numpy array."""
    if isinstance(indices, torch.Tensor):
        return indices.detach().cpu().numpy().astype(np.int64, copy=False).reshape(-1)
    return np.asarray(indices, dtype=np.int64).reshape(-1)
