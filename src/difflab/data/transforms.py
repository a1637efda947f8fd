"""Resize, channel and padding changes on whole uint8 datasets [N, C, H, W]."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from difflab.errors import DataError

# ITU-R 601 luma, the weights Pillow's convert("L") uses.
_LUMA = torch.tensor([0.299, 0.587, 0.114])


def check_settings(image_size: int | None, channels: int | None, pad_to: int | None) -> None:
    """Reject impossible settings before any data is read."""
    if image_size is not None and image_size < 1:
        raise DataError(f"image_size must be a positive number of pixels, got {image_size}")
    if channels not in (None, 1, 3):
        raise DataError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels}")
    if pad_to is not None and pad_to < 1:
        raise DataError(f"pad_to must be a positive number of pixels, got {pad_to}")


def resize(images: torch.Tensor, size: int, chunk: int = 2048) -> torch.Tensor:
    """Square images resized to ``size`` x ``size`` (bicubic, antialiased when shrinking)."""
    n, c, h, w = images.shape
    if (h, w) == (size, size):
        return images
    out = torch.empty(n, c, size, size, dtype=torch.uint8)
    for i in range(0, n, chunk):  # in chunks: float copies of a whole dataset can be gigabytes
        x = images[i:i + chunk].float()
        y = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
        out[i:i + chunk] = y.round_().clamp_(0, 255).to(torch.uint8)
    return out


def set_channels(images: torch.Tensor, channels: int) -> torch.Tensor:
    """Grayscale repeated to RGB, or RGB reduced to luma."""
    c = images.shape[1]
    if c == channels:
        return images
    if c == 1 and channels == 3:
        return images.expand(-1, 3, -1, -1).contiguous()
    if c == 3 and channels == 1:
        luma = torch.einsum("nchw,c->nhw", images.float(), _LUMA)
        return luma.round_().clamp_(0, 255).to(torch.uint8).unsqueeze(1)
    raise DataError(f"cannot turn {c}-channel images into {channels}-channel ones")


def pad(images: torch.Tensor, pad_to: int) -> torch.Tensor:
    """Images padded with black (zeros) on all sides, centred, to ``pad_to`` x ``pad_to``."""
    h, w = images.shape[2:]
    if (h, w) == (pad_to, pad_to):
        return images
    if h > pad_to or w > pad_to:
        raise DataError(f"pad_to={pad_to} is smaller than the images ({h}x{w}): "
                        f"use image_size to shrink them instead")
    top, left = (pad_to - h) // 2, (pad_to - w) // 2
    return F.pad(images, (left, pad_to - w - left, top, pad_to - h - top))


def apply(images: torch.Tensor, image_size: int | None, channels: int | None,
          pad_to: int | None) -> torch.Tensor:
    """Resize, then change channels, then pad; each step only when asked for."""
    if image_size is not None:
        images = resize(images, image_size)
    if channels is not None:
        images = set_channels(images, channels)
    if pad_to is not None:
        images = pad(images, pad_to)
    return images
