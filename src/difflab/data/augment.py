"""Random crops that keep a run exact: a source decoded somewhat larger than the run's size, cropped back per
sample at offsets that are a pure function of (seed, step, position), like the flips, so a resumed run sees
the same crops. The network, its samples and the checkpoint only ever see the run's size."""

from __future__ import annotations

import torch

from difflab.data import cache
from difflab.data.source import ImageSource, Indices, StreamedSource
from difflab.noise import seeded_uniform

_SALT_X, _SALT_Y = 0xC0FFEE, 0xC0FFE7


def larger_size(size: int, crop: float) -> int:
    """The size a source is decoded at for crops of ``size`` that move by up to ``crop`` of it (at least 1 pixel)."""
    return size + max(1, round(size * crop))


class RandomCrops(StreamedSource):
    """``source`` (square, larger than ``size``) seen as ``size`` x ``size`` images: :meth:`read` gives centre
    crops (for anything that reads a few images), :meth:`crop` the training crops of a batch."""

    def __init__(self, source: ImageSource, size: int):
        if not 0 < size < source.height or source.height != source.width:
            raise ValueError(f"crops of {size} need a larger square source, got {source.height}x{source.width}")
        self.source, self.size = source, size
        self.shape = (source.channels, size, size)
        self.name, self.labels, self.class_names = source.name, source.labels, source.class_names
        self.captions = source.captions
        self.fingerprint = cache.source_key("crops", source.fingerprint, size)

    def __len__(self) -> int:
        return len(self.source)

    def read(self, indices: Indices) -> torch.Tensor:
        lo = (self.source.height - self.size) // 2
        return self.source.read(indices)[..., lo:lo + self.size, lo:lo + self.size]

    def crop(self, images: torch.Tensor, seeds: torch.Tensor, step: int) -> torch.Tensor:
        """Each of ``images`` [B, C, H, W] (read from ``source``) cropped at its own offsets, drawn from its seed and
        ``step``, on the images' device."""
        b, c, extra = images.shape[0], images.shape[1], images.shape[-1] - self.size
        dev = images.device
        x, y = (torch.floor(seeded_uniform(seeds, step, (), dev, salt=s) * (extra + 1)).long().clamp_(max=extra)
                for s in (_SALT_X, _SALT_Y))
        span = torch.arange(self.size, device=dev)
        rows, cols = (y[:, None] + span)[:, None, :, None], (x[:, None] + span)[:, None, None, :]
        return images[torch.arange(b, device=dev)[:, None, None, None], torch.arange(c, device=dev)[None, :, None, None],
                      rows, cols]
