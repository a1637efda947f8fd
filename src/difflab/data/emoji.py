"""Colour emoji with their Unicode names as captions: a small text-to-image dataset.

Two offline sources of the same artwork (Google's Noto Color Emoji), whichever is installed:

- ``font``: the Debian/Ubuntu package ``fonts-noto-color-emoji`` (NotoColorEmoji.ttf, a CBDT
  bitmap font that Pillow renders only at size 109, with ``embedded_color=True``);
- ``npm``: the npm package ``emoji-datasource-google`` (64x64 PNGs and emoji.json), found in
  ./node_modules, in $NODE_PATH or in the global node_modules folders.

``$DIFFLAB_EMOJI`` may name either (the .ttf file or the package folder). The font wins when both
are there. The set is every emoji that is a single code point (with or without VS16) and that
Python's ``unicodedata`` can name: flags, skin tones and ZWJ sequences are left out, so both
sources give the same emoji (1357 with Python 3.11's Unicode 14: 1236 train, 121 test).

Each image is the emoji's square cell composited onto white, RGB, resized (Lanczos) to
``image_size`` (default 32). The caption is the lower-case Unicode name ("grinning face").
Every emoji is its own class: ``labels[i] = i`` and ``class_names[i]`` is the caption of image
i, so per-sample captions are ``[data.class_names[k] for k in labels]``. The split is fixed by a
hash of the code point (about 90% train, 10% test). Decoded arrays are cached as .npz files
(``difflab.data.cache``).
"""

from __future__ import annotations

import hashlib
import json
import os
import unicodedata
from pathlib import Path

import numpy as np
import torch

from difflab.data import cache
from difflab.errors import DataError

INSTALL = ("emoji needs colour emoji images: apt-get install fonts-noto-color-emoji, "
           "or npm install emoji-datasource-google (or set DIFFLAB_EMOJI to NotoColorEmoji.ttf "
           "or that package's folder)")
FONT_PATHS = (
    "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf",  # Debian, Ubuntu
    "/usr/share/fonts/noto/NotoColorEmoji.ttf",  # Arch
    "/usr/share/fonts/google-noto-color-emoji-fonts/NotoColorEmoji.ttf",  # Fedora
    "/usr/share/fonts/google-noto-emoji/NotoColorEmoji.ttf",  # older Fedora
)
NPM_NAME = "emoji-datasource-google"
NPM_ROOTS = ("/usr/local/lib/node_modules", "/usr/lib/node_modules", "~/.npm-global/lib/node_modules")
FONT_SIZE = 109  # the one size of the font's bitmaps (136 x 128 cells)
FONT_CELL = (4, 0, 132, 128)  # the square around the art in a 136 x 128 cell, as in the 64 px PNGs
DEFAULT_SIZE = 32
TEST_PERCENT = 10

_INVISIBLE = {0x200D, 0xFE0E, 0xFE0F}  # ZWJ and variation selectors: no name in a caption
_COMPONENTS = (  # parts of sequences, not emoji of their own
    range(0x1F1E6, 0x1F200),  # regional indicators (flags)
    range(0x1F3FB, 0x1F400),  # skin tones
    range(0x1F9B0, 0x1F9B4),  # hair components
    range(0xE0020, 0xE0080),  # tags (subdivision flags)
    range(0x20E3, 0x20E4),  # combining keycap
)


def caption(text: str) -> str | None:
    """The lower-case Unicode names of an emoji's code points, joined with spaces.

    ZWJ and variation selectors are skipped and "emoji component " dropped, e.g. "\u2764\ufe0f" ->
    "heavy black heart"; None when a code point has no name in this Python's ``unicodedata``.
    """
    names = []
    for ch in text:
        if ord(ch) in _INVISIBLE:
            continue
        name = unicodedata.name(ch, None)
        if name is None:
            return None
        names.append(name.lower().removeprefix("emoji component "))
    return " ".join(names) or None


def _wanted(cp: int) -> bool:
    """A single code point that is an emoji of its own and has a Unicode name here."""
    if cp < 0x80 or cp in _INVISIBLE or any(cp in r for r in _COMPONENTS):
        return False
    return unicodedata.name(chr(cp), None) is not None


def _is_test(cp: int) -> bool:
    return int(hashlib.sha1(f"U+{cp:04X}".encode()).hexdigest(), 16) % 100 < TEST_PERCENT


def _npm_folder(path: Path) -> Path | None:
    for folder in (path, path / "package", path / NPM_NAME, path / "node_modules" / NPM_NAME):
        if (folder / "emoji.json").is_file() and (folder / "img" / "google" / "64").is_dir():
            return folder
    return None


def find_source(source: str = "auto") -> tuple[str, Path]:
    """("font", NotoColorEmoji.ttf) or ("npm", package folder); DataError with the fix if neither."""
    if source not in ("auto", "font", "npm"):
        raise DataError(f"unknown emoji source '{source}': use auto, font or npm")
    env = os.environ.get("DIFFLAB_EMOJI")
    candidates: list[tuple[str, Path]] = []
    if env:
        p = Path(env).expanduser()
        if p.is_file():
            candidates.append(("font", p))
        elif (folder := _npm_folder(p)) is not None:
            candidates.append(("npm", folder))
        else:
            raise DataError(f"DIFFLAB_EMOJI={env} is neither NotoColorEmoji.ttf nor a {NPM_NAME} folder")
    candidates += [("font", Path(p)) for p in FONT_PATHS if Path(p).is_file()]
    roots = [Path.cwd(), Path.cwd() / "node_modules"]
    roots += [Path(p) for p in os.environ.get("NODE_PATH", "").split(os.pathsep) if p]
    roots += [Path(p).expanduser() for p in NPM_ROOTS]
    candidates += [("npm", f) for r in roots if (f := _npm_folder(r / NPM_NAME)) is not None]
    for kind, path in candidates:
        if source in ("auto", kind):
            return kind, path
    raise DataError(INSTALL if source == "auto" else f"emoji source '{source}' not found: {INSTALL}")


def _on_white(rgba, size: int) -> np.ndarray:
    """A square RGBA Pillow image composited onto white, resized, as uint8 [3, size, size]."""
    from PIL import Image

    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    rgb = Image.alpha_composite(white, rgba.convert("RGBA")).convert("RGB")
    if rgb.size != (size, size):
        rgb = rgb.resize((size, size), Image.Resampling.LANCZOS)
    return np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1)


def _render_font(path: Path, size: int) -> dict[int, np.ndarray]:
    """Every wanted code point of the font's character map, rendered."""
    from fontTools.ttLib import TTFont  # ships with matplotlib, a dependency of difflab
    from PIL import Image, ImageDraw, ImageFont

    with TTFont(str(path), lazy=True) as tt:
        cps = sorted(cp for cp in tt["cmap"].getBestCmap() if _wanted(cp))
    try:
        font = ImageFont.truetype(str(path), FONT_SIZE)
    except OSError as e:
        raise DataError(f"Pillow cannot read {path} ({e}): reinstall fonts-noto-color-emoji") from e
    out = {}
    for cp in cps:
        canvas = Image.new("RGBA", (136, 128), (0, 0, 0, 0))
        ImageDraw.Draw(canvas).text((0, 0), chr(cp), font=font, embedded_color=True)
        out[cp] = _on_white(canvas.crop(FONT_CELL), size)
    return out


def _read_npm(folder: Path, size: int) -> dict[int, np.ndarray]:
    """Every wanted single-code-point emoji of emoji.json that has a Google 64 px image."""
    from PIL import Image

    try:
        entries = json.loads((folder / "emoji.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(f"{folder / 'emoji.json'} is unreadable ({e}): reinstall {NPM_NAME}") from e
    out = {}
    for e in entries:
        cps = [int(h, 16) for h in e.get("unified", "").split("-") if h]
        cps = [cp for cp in cps if cp not in (0xFE0E, 0xFE0F)]
        png = folder / "img" / "google" / "64" / str(e.get("image", ""))
        if len(cps) != 1 or not _wanted(cps[0]) or not png.is_file():
            continue
        with Image.open(png) as im:
            out[cps[0]] = _on_white(im, size)
    return out


def _decode(kind: str, path: Path, size: int) -> dict[str, dict[str, np.ndarray]]:
    from difflab.data.imagedata import fingerprint

    images = _render_font(path, size) if kind == "font" else _read_npm(path, size)
    if not images:
        raise DataError(f"no emoji found in {path}: reinstall it ({INSTALL})")
    out = {}
    for split in ("train", "test"):
        cps = [cp for cp in sorted(images) if _is_test(cp) == (split == "test")]
        arr = np.stack([images[cp] for cp in cps]) if cps else np.zeros((0, 3, size, size), np.uint8)
        labels = np.arange(len(cps), dtype=np.int64)
        out[split] = {
            "images": arr,
            "labels": labels,
            "captions": np.array([caption(chr(cp)) for cp in cps], dtype=str),
            "codepoints": np.array(cps, dtype=np.int64),
            "fingerprint": np.array(fingerprint(arr, labels)),
        }
    return out


def load_emoji(
    split: str = "train",
    image_size: int | None = None,
    channels: int | None = None,
    cache_dir: str | Path | None = None,
    *,
    source: str = "auto",
):
    """Emoji ``split`` as ImageData: images uint8 [N, 3, S, S] (S = image_size or 32),
    ``labels = arange(N)`` and ``class_names[i]`` = caption of image i.

    channels=1 gives luma. source: "auto", "font" or "npm" (see the module docstring).
    """
    from difflab.data.imagedata import ImageData
    from difflab.data.transforms import set_channels

    if split not in ("train", "test"):
        raise DataError(f"unknown split '{split}' for emoji: use train or test")
    size = DEFAULT_SIZE if image_size is None else int(image_size)
    if size < 1:
        raise DataError(f"image_size must be a positive number of pixels, got {image_size}")
    if channels not in (None, 1, 3):
        raise DataError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels}")
    kind, path = find_source(source)
    stamp = cache.file_stamp(path if kind == "font" else path / "emoji.json")
    key = cache.source_key(kind, stamp, size, unicodedata.unidata_version)
    arrays = cache.cached_splits(cache_dir, f"emoji-{kind}-{size}", key, split,
                                 lambda: _decode(kind, path, size))
    images = torch.from_numpy(np.ascontiguousarray(arrays["images"]))
    known = str(arrays["fingerprint"])
    if channels == 1:
        images, known = set_channels(images, 1), ""
    return ImageData(images, torch.from_numpy(arrays["labels"]).long(),
                     [str(c) for c in arrays["captions"]], "emoji", known)
