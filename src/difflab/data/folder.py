"""A folder of images (PNG, JPEG, WebP, BMP, the first frame of GIFs; at any depth) as a dataset.

* Labels and captions (see :mod:`difflab.data.labels`): from a ``metadata.jsonl`` (Hugging Face
  ``imagefolder``), else the first-level sub-folder an image sits in (``root/cat/x.png`` is class "cat",
  class names sorted) when ``labels`` is True, or when it is None and the sub-folders are not all
  numbered shards (``0000/``...); else unlabelled.
* Size: the shorter side is resized to ``image_size`` (Lanczos) and the centre square cropped.
  Without ``image_size`` the images must be square; the first image's size is used.
* Channels: 1 ('L') or 3 ('RGB'); transparency is composited onto ``background`` (white or black).
  Without ``channels``: 1 when every image is grayscale (by mode, or RGB with three equal channels), else 3.
* Files that cannot be decoded are skipped with one warning; hidden files and folders are ignored.
* A folder holding ``train/`` (and ``test/``...) sub-folders gives those splits.

A folder of fewer than ``STREAM_FROM`` images is decoded once, in a thread pool (Pillow releases the
GIL), and cached, keyed by the folder, every file's size and modification time, and the settings. A
larger one is a :class:`FolderSource`: only listed, its size and channels decided from a sample of
headers, and decoded batch by batch in the loader's worker processes (see :func:`open_folder`).
"""

from __future__ import annotations

import os
import stat
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from PIL import Image, ImageOps

from difflab.data import cache
from difflab.data.imagedata import ImageData, fingerprint
from difflab.data.labels import Metadata, annotate, described, read_metadata
from difflab.data.progress import progress
from difflab.data.source import Indices, StreamedSource, as_index
from difflab.errors import DataError

SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif"})
BACKGROUNDS = {"white": 255, "black": 0}
_GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
_PARALLEL_FROM = 64  # below this many files a thread pool costs more than it saves
# From this many files a folder streams. Decoding costs 0.4-1 ms an image (PNG or JPEG to 32 or 64 px) against
# about 3 ms an image of a CPU training step, so streaming costs a CPU run little, but decoding 50,000 images up
# front would keep the first step waiting 20-50 s and hold up to 600 MB (64 px colour) in memory.
STREAM_FROM = 50_000
HEADER_SAMPLE = 64  # a streamed folder's size and channels are read from this many headers, spread over it
_A = TypeVar("_A")
_T = TypeVar("_T")


def list_images(root: Path) -> list[tuple[Path, int, int]]:
    """(relative path, size, mtime_ns) of every image file under ``root``, sorted by path. Only regular
    files count (a FIFO or device named x.png would block or never end); links are followed only to
    files inside ``root``; the others are left out with one warning."""
    found, refused = [], []
    bar = progress(desc=f"indexing {root.name}", unit="file")
    for folder, dirs, files in os.walk(root):  # links to folders are not followed
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        bar.update(len(files))
        for name in files:
            if name.startswith(".") or os.path.splitext(name)[1].lower() not in SUFFIXES:
                continue
            path = Path(folder, name)
            try:
                st = path.stat()
                inside = not path.is_symlink() or path.resolve(strict=True).is_relative_to(root)
            except (OSError, RuntimeError):  # a dangling link, a loop
                st, inside = None, False
            if st is None or not inside or not stat.S_ISREG(st.st_mode):
                refused.append(path.relative_to(root).as_posix())
                continue
            found.append((path.relative_to(root), st.st_size, st.st_mtime_ns))
    bar.close()
    if refused:
        shown = ", ".join(sorted(refused)[:3]) + (", ..." if len(refused) > 3 else "")
        warnings.warn(f"left out {len(refused)} entries of {root} that are not regular image files inside it "
                      f"(links elsewhere or broken, pipes, devices): {shown}", stacklevel=3)
    found.sort(key=lambda item: item[0].as_posix())
    return found


def _is_gray(im: Image.Image) -> bool:
    if im.mode in _GRAY_MODES:
        return True
    if im.mode == "P":  # palette images (e.g. from pngquant) are often gray
        palette = im.getpalette() or []
        return palette[0::3] == palette[1::3] == palette[2::3]
    return False


MAX_PIXELS = 1 << 26  # per image: a header claiming more is refused (a decompression bomb takes unbounded time)


def _header(path: Path) -> tuple[int, int, bool]:
    """Width, height and grayscale-ness, read from the file header."""
    with Image.open(path) as im:
        if im.width * im.height > MAX_PIXELS:
            raise DataError(f"{im.width}x{im.height} pixels is more than difflab decodes ({MAX_PIXELS})")
        return im.width, im.height, _is_gray(im)


def _convert(im: Image.Image, channels: int, background: str = "white") -> Image.Image:
    """``im`` as 'L' or 'RGB', 16-bit gray scaled to 8 bits, transparency composited onto ``background``."""
    if im.mode.startswith("I") or im.mode == "F":  # 16-bit PNG: convert("L") would clip, not scale
        a = np.asarray(im, dtype=np.float64) / 257
        im = Image.fromarray(a.round().clip(0, 255).astype(np.uint8))
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        v = BACKGROUNDS[background]
        im = Image.new("RGBA", rgba.size, (v, v, v, 255))
        im.alpha_composite(rgba)
    target = "L" if channels == 1 else "RGB"
    return im if im.mode == target else im.convert(target)


def decode(path: Path, size: int, channels: int, background: str = "white") -> np.ndarray:
    """One image file (a GIF: its first frame) as uint8 [channels, size, size]: shorter side resized to size,
    centre-cropped, transparency composited onto ``background``."""
    with Image.open(path) as im:
        if im.format == "JPEG":  # let libjpeg shrink by 2/4/8 while decoding; keeps >= size
            im.draft("L" if channels == 1 else im.mode, (size, size))
        im = ImageOps.exif_transpose(im)
        im = _convert(im, channels, background)
        w, h = im.size
        if (w, h) != (size, size):
            side = min(w, h)
            left, top = (w - side) / 2, (h - side) / 2
            im = im.resize((size, size), Image.Resampling.LANCZOS,
                           box=(left, top, left + side, top + side), reducing_gap=3.0)
        a = np.asarray(im, dtype=np.uint8)
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


def _map(fn: Callable[[_A], _T], items: Sequence[_A], desc: str) -> list[_T | Exception]:
    """``fn`` over ``items`` (threaded when many, with progress), each exception returned in place of its result."""
    def safe(item: _A) -> _T | Exception:
        try:
            return fn(item)
        except Exception as e:  # noqa: BLE001  a bad file may make Pillow raise almost anything
            return e

    if len(items) < _PARALLEL_FROM:
        return [safe(item) for item in items]
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return list(progress(pool.map(safe, items), total=len(items), desc=desc))


def _warn(root: Path, arrays: dict[str, np.ndarray]) -> None:
    """The warnings of a decode, repeated when the result comes from the cache."""
    skipped = [str(s) for s in arrays["skipped"]]
    if skipped:
        shown = ", ".join(skipped[:3]) + (", ..." if len(skipped) > 3 else "")
        warnings.warn(f"skipped {len(skipped)} unreadable image file(s) in {root}: {shown}", stacklevel=4)
    _warn_mixed(root, bool(arrays["mixed"]), stacklevel=5)


def _warn_mixed(root: Path, mixed: bool, stacklevel: int) -> None:
    if mixed:
        warnings.warn(f"{root} has images both in its root and in sub-folders: loading them unlabelled "
                      f"(put every image in a class sub-folder to get labels)", stacklevel=stacklevel)


def _unreadable(root: Path, count: int, skipped: list[tuple[Path, Exception]]) -> DataError:
    rel, err = skipped[0]
    return DataError(f"none of the {count} image files in {root} could be read (e.g. {rel.as_posix()}: {err})")


def _decode_folder(root: Path, files: list[Path], image_size: int | None, channels: int | None, background: str,
                   metadata: Metadata | None, labels: bool | None) -> dict[str, np.ndarray]:
    headers = _map(lambda rel: _header(root / rel), files, f"reading headers of {root.name}")
    skipped = [(rel, h) for rel, h in zip(files, headers) if isinstance(h, Exception)]
    good = [(rel, h) for rel, h in zip(files, headers) if not isinstance(h, Exception)]
    if not good:
        raise _unreadable(root, len(files), skipped)
    if image_size is None:
        odd = next(((rel, w, h) for rel, (w, h, _) in good if w != h), None)
        if odd is not None:
            raise DataError(f"the images in {root} are not all square ({odd[0].as_posix()} is "
                            f"{odd[1]}x{odd[2]}): pass --image-size N to resize and centre-crop them")
        image_size = good[0][1][0]
    gray_by_mode = all(gray for _, (_, _, gray) in good)
    decode_channels = channels or (1 if gray_by_mode else 3)

    images = np.empty((len(good), decode_channels, image_size, image_size), np.uint8)

    def fill(i: int) -> None:
        images[i] = decode(root / good[i][0], image_size, decode_channels, background)

    results = _map(fill, range(len(good)), f"decoding {root.name}")
    ok = [i for i, r in enumerate(results) if not isinstance(r, Exception)]
    skipped += [(good[i][0], r) for i, r in enumerate(results) if isinstance(r, Exception)]
    if not ok:
        raise _unreadable(root, len(files), skipped)
    kept = [good[i][0] for i in ok]
    if len(ok) < len(good):
        images = images[ok]
    if channels is None and decode_channels == 3 and (images[:, 0] == images[:, 1]).all() \
            and (images[:, 0] == images[:, 2]).all():
        images = np.ascontiguousarray(images[:, :1])  # RGB files that hold gray pictures

    out = {"images": images, "skipped": np.array(sorted(rel.as_posix() for rel, _ in skipped), dtype=str)}
    out.update(annotate(kept, metadata, labels))
    out["fingerprint"] = np.array(fingerprint(images, out.get("labels")))
    return out


def _split_root(path: str | Path, split: str) -> Path:
    root = Path(path).expanduser().resolve()
    if not root.is_dir():
        raise DataError(f"{path} is not a folder of images")
    if (root / split).is_dir():
        root = root / split
    elif split != "train":
        raise DataError(f"{root} has no '{split}' sub-folder: a folder of images is a train split "
                        f"unless it holds train/ and {split}/ sub-folders")
    return root


def _listing(root: Path) -> tuple[list[tuple[Path, int, int]], Metadata | None]:
    """The image files under ``root`` (those ``metadata.jsonl`` lists, when there is one) and the metadata."""
    listing = list_images(root)
    if not listing:
        raise DataError(f"no images (PNG, JPEG, WebP, BMP, GIF) found in {root}")
    metadata = read_metadata(root)
    if metadata is not None:
        kept = set(described(root, [rel for rel, _, _ in listing], metadata))
        listing = [item for item in listing if item[0] in kept]
    return listing, metadata


def open_folder(path: str | Path, *, split: str = "train", image_size: int | None = None, channels: int | None = None,
                cache_dir: str | Path | None = None, labels: bool | None = None,
                background: str = "white") -> ImageData | FolderSource:
    """The images under ``path``: in memory (:func:`load_folder`) below ``STREAM_FROM`` files, else a
    :class:`FolderSource` that decodes them batch by batch."""
    root = _split_root(path, split)
    listing, metadata = _listing(root)
    if len(listing) < STREAM_FROM:
        return _load_listed(root, listing, metadata, image_size, channels, cache_dir, labels, background)
    return FolderSource(root, listing, metadata, image_size, channels, labels, background)


def load_folder(path: str | Path, *, split: str = "train", image_size: int | None = None, channels: int | None = None,
                cache_dir: str | Path | None = None, labels: bool | None = None, background: str = "white") -> ImageData:
    """The images under ``path``, decoded into memory (see the module docstring for labels, sizes and channels)."""
    root = _split_root(path, split)
    listing, metadata = _listing(root)
    return _load_listed(root, listing, metadata, image_size, channels, cache_dir, labels, background)


def _load_listed(root: Path, listing: list[tuple[Path, int, int]], metadata: Metadata | None, image_size: int | None,
                 channels: int | None, cache_dir: str | Path | None, labels: bool | None, background: str) -> ImageData:
    if background not in BACKGROUNDS:
        raise DataError(f"background must be white or black, got {background!r}")
    settings = cache.source_key(str(root), image_size, channels, labels, background, metadata and metadata.stamp)
    content = cache.source_key([(rel.as_posix(), size, mtime) for rel, size, mtime in listing])
    cache_file = cache.cache_root(cache_dir) / "folders" / f"{settings}-{content}.npz"
    arrays = cache.read(cache_file)
    if arrays is None:
        arrays = _decode_folder(root, [rel for rel, _, _ in listing], image_size, channels, background, metadata, labels)
        cache.write(cache_file, arrays, stale=f"{settings}-*.npz")
    _warn(root, arrays)

    found = arrays.get("labels")
    names = arrays.get("class_names")
    captions = arrays.get("captions")
    return ImageData(
        images=torch.from_numpy(arrays["images"]),
        labels=None if found is None else torch.from_numpy(found),
        class_names=None if names is None else [str(n) for n in names],
        name=str(root),
        fingerprint=str(arrays["fingerprint"]),
        captions=None if captions is None else [str(c) for c in captions],
    )


class FolderSource(StreamedSource):
    """A folder of images decoded batch by batch. Size and channels come from ``image_size`` and ``channels``
    or from the headers of ``HEADER_SAMPLE`` files spread over the folder (they must be square and of one size;
    channels 1 when all are gray); every file is decoded with :func:`decode` at that size (another size is
    resized, the centre square cropped). A file that cannot be decoded is replaced by the next one that can,
    with a warning, so a batch keeps its size and the run its order."""

    def __init__(self, root: Path, listing: list[tuple[Path, int, int]], metadata: Metadata | None,
                 image_size: int | None, channels: int | None, labels: bool | None = None, background: str = "white"):
        if background not in BACKGROUNDS:
            raise DataError(f"background must be white or black, got {background!r}")
        self.root, self.name, self.background = root, str(root), background
        self.files = [rel for rel, _, _ in listing]
        step = max(1, len(self.files) // HEADER_SAMPLE)
        sample = self.files[::step][:HEADER_SAMPLE]
        headers = [h for h in _map(lambda rel: _header(root / rel), sample, "") if not isinstance(h, Exception)]
        if not headers:
            raise DataError(f"none of {len(sample)} sampled image files of {root} could be read")
        size = image_size
        if size is None:
            odd = next(((w, h) for w, h, _ in headers if (w, h) != headers[0][:2] or w != h), None)
            if odd is not None:
                raise DataError(f"the images in {root} are not all square and of one size (one is {odd[0]}x{odd[1]}): "
                                "pass --image-size N to resize and centre-crop them")
            size = headers[0][0]
        self.shape = (channels or (1 if all(gray for _, _, gray in headers) else 3), size, size)
        found = annotate(self.files, metadata, labels)
        _warn_mixed(root, bool(found["mixed"]), stacklevel=4)
        self.labels = torch.from_numpy(found["labels"]) if "labels" in found else None
        self.class_names = [str(n) for n in found["class_names"]] if "class_names" in found else None
        self.captions = [str(c) for c in found["captions"]] if "captions" in found else None
        stamp = [(rel.as_posix(), size, mtime) for rel, size, mtime in listing]
        self.fingerprint = cache.source_key("stream", str(root), self.shape, background, stamp,
                                            None if self.labels is None else self.labels.tolist(), self.captions)
        self._warned: set[int] = set()

    def __len__(self) -> int:
        return len(self.files)

    def read(self, indices: Indices) -> torch.Tensor:
        idx = as_index(indices)
        out = np.empty((len(idx), *self.shape), np.uint8)
        for j, i in enumerate(idx.tolist()):
            out[j] = self._decode(i)
        return torch.from_numpy(out)

    def _decode(self, i: int) -> np.ndarray:
        c, size, _ = self.shape
        for k in range(len(self.files)):
            j = (i + k) % len(self.files)
            try:
                return decode(self.root / self.files[j], size, c, self.background)
            except Exception as e:  # noqa: BLE001  a bad file may make Pillow raise almost anything
                if j not in self._warned:
                    self._warned.add(j)
                    warnings.warn(f"skipped unreadable image file {self.files[j].as_posix()} in {self.root}: {e}",
                                  stacklevel=2)
        raise DataError(f"none of the {len(self.files)} image files in {self.root} could be read")
