"""Images that arrive as bytes (an upload to ``difflab serve``, a notebook's file): checked for size
before Pillow decodes them, then fitted to a run's (C, H, W) like a folder's images."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from difflab.data.folder import decode
from difflab.errors import DataError

MAX_BYTES = 4 << 20  # 4 MiB of file
MAX_PIXELS = 4096 * 4096
FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF")


def decode_image_bytes(data: bytes, shape: tuple[int, int, int], *, max_bytes: int = MAX_BYTES,
                       max_pixels: int = MAX_PIXELS) -> torch.Tensor:
    """uint8 [C, H, W] of an image file's bytes, fitted to ``shape`` (shorter side resized, centre
    crop, 1 or 3 channels). DataError with one line for too many bytes or pixels (read from the header,
    before any pixel is decoded), an unknown format or a broken file."""
    if len(data) > max_bytes:
        raise DataError(f"the image is {len(data) / 2**20:.1f} MiB; the limit is {max_bytes / 2**20:.0f} MiB")
    c, h, w = shape
    if h != w:
        raise DataError(f"images can be fitted only to square runs, this one is {h}x{w}")
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.format not in FORMATS:
                raise DataError(f"unsupported image format {im.format}; use {', '.join(FORMATS)}")
            if im.width * im.height > max_pixels:
                raise DataError(f"the image is {im.width}x{im.height} pixels; the limit is {max_pixels:,} pixels")
        array = decode(io.BytesIO(data), h, c)  # type: ignore[arg-type]  # Image.open takes a file object
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"cannot read the upload as an image ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from e
    return torch.from_numpy(np.array(array, dtype=np.uint8, copy=True))
