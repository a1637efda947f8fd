"""Colour textures: random crops of the sample photos that ship inside scikit-image's wheel.

The eight colour photos of ``skimage/data`` (:data:`PHOTOS`: an astronaut, coffee, a cat, a rocket, the
Hubble deep field, a stained tissue, a retina, a motorcycle) are read straight from the installed package
with Pillow: scikit-image's own loaders are not called, so nothing is ever downloaded. Each image is a
square crop whose side is a fraction (:data:`SCALES`) of the photo's shorter side, at a position drawn by a
fixed seed, resized (Lanczos) to ``image_size`` (default 32): close-ups of fine texture next to wider views.
Flat crops (the black corners around the retina) are left out.

Per photo and scale, :data:`TRAIN_PER_SCALE` crops train and :data:`TEST_PER_SCALE` more are the held-out
test split (4,080 and 504 images). The two splits never share a crop position, though their crops may
overlap: the test split holds out crops, not photos. ``labels[i]`` is the photo of image i and
``class_names`` the photos' names. Decoded arrays are cached (``difflab.data.cache``).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch

from difflab.data import cache
from difflab.errors import DataError

INSTALL = "the textures dataset crops scikit-image's sample photos: pip install scikit-image (or 'difflab[textures]')"
PHOTOS = {"astronaut": "astronaut.png", "coffee": "coffee.png", "cat": "chelsea.png", "rocket": "rocket.jpg",
          "hubble": "hubble_deep_field.jpg", "tissue": "ihc.png", "retina": "retina.jpg",
          "motorcycle": "motorcycle_left.png"}
SCALES = (0.1, 0.2, 0.4)  # crop side / the photo's shorter side
TRAIN_PER_SCALE, TEST_PER_SCALE = 170, 21
DEFAULT_SIZE = 32
SEED = 23
FLAT = 16  # a crop whose pixels span fewer levels is left out (the black corners around the retina)


def photo_folder() -> Path:
    """scikit-image's folder of bundled sample images; DataError with the pip command when it is missing."""
    spec = importlib.util.find_spec("skimage")  # finds the package without importing it
    folders = [Path(f) / "data" for f in (spec.submodule_search_locations or [])] if spec is not None else []
    for folder in folders:
        if all((folder / name).is_file() for name in PHOTOS.values()):
            return folder
    if not folders:
        raise DataError(INSTALL)
    raise DataError(f"scikit-image at {folders[0].parent} lacks some of its sample photos "
                    f"({', '.join(PHOTOS.values())}): pip install --force-reinstall scikit-image")


def _crops(photo, count: int, size: int, rng: np.random.Generator) -> tuple[list[np.ndarray], list[tuple]]:
    """``count`` crops per scale at distinct positions, resized to ``size``: (uint8 [3, size, size] arrays,
    their (scale, top, left)). Flat crops (a range under :data:`FLAT` levels) are skipped."""
    from PIL import Image

    width, height = photo.size
    images, places = [], []
    for scale in SCALES:
        side = max(1, round(scale * min(width, height)))
        across = width - side + 1
        positions = across * (height - side + 1)
        kept = 0
        for k in rng.choice(positions, min(positions, 2 * count), replace=False):
            top, left = divmod(int(k), across)
            crop = photo.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.LANCZOS)
            pixels = np.asarray(crop, np.uint8).transpose(2, 0, 1)
            if int(pixels.max()) - int(pixels.min()) < FLAT:
                continue
            images.append(pixels)
            places.append((scale, top, left))
            kept += 1
            if kept == count:
                break
        if kept < count:
            raise DataError(f"a scikit-image sample photo gave only {kept} of {count} crops with texture: "
                            f"pip install --force-reinstall scikit-image")
    return images, places


def _decode(folder: Path, size: int) -> dict[str, dict[str, np.ndarray]]:
    from PIL import Image

    from difflab.data.imagedata import fingerprint

    parts: dict[str, list] = {"train": [], "test": []}
    for label, file in enumerate(PHOTOS.values()):
        try:
            with Image.open(folder / file) as im:
                photo = im.convert("RGB")
        except OSError as e:
            raise DataError(f"{folder / file} is unreadable ({e}): pip install --force-reinstall scikit-image") from e
        # one draw of distinct positions per photo: the first crops train, the rest test
        images, places = _crops(photo, TRAIN_PER_SCALE + TEST_PER_SCALE, size, np.random.default_rng([SEED, label]))
        for i, (image, place) in enumerate(zip(images, places)):
            split = "train" if i % (TRAIN_PER_SCALE + TEST_PER_SCALE) < TRAIN_PER_SCALE else "test"
            parts[split].append((image, label, place))
    out = {}
    for split, rows in parts.items():
        images = np.stack([r[0] for r in rows])
        labels = np.array([r[1] for r in rows], dtype=np.int64)
        out[split] = {"images": images, "labels": labels, "places": np.array([r[2] for r in rows], dtype=np.float64),
                      "fingerprint": np.array(fingerprint(images, labels))}
    return out


def _arrays(split: str, image_size: int | None, cache_dir: str | Path | None) -> dict[str, np.ndarray]:
    """The cached arrays of ``split`` (decoded on a miss): images, labels, places, fingerprint."""
    if split not in ("train", "test"):
        raise DataError(f"unknown split '{split}' for textures: use train or test")
    size = DEFAULT_SIZE if image_size is None else int(image_size)
    if size < 1:
        raise DataError(f"image_size must be a positive number of pixels, got {image_size}")
    folder = photo_folder()
    stamps = [cache.file_stamp(folder / f) for f in PHOTOS.values()]
    key = cache.source_key(stamps, SCALES, TRAIN_PER_SCALE, TEST_PER_SCALE, SEED, size)
    return cache.cached_splits(cache_dir, f"textures-{size}", key, split, lambda: _decode(folder, size))


def load_textures(split: str = "train", image_size: int | None = None, channels: int | None = None,
                  cache_dir: str | Path | None = None):
    """The textures ``split`` ("train" or "test") as ImageData: images uint8 [N, 3, S, S] (S = image_size or
    32; channels=1 gives luma), labels the photo each crop is from."""
    from difflab.data.imagedata import ImageData
    from difflab.data.transforms import set_channels

    arrays = _arrays(split, image_size, cache_dir)
    images, known = torch.from_numpy(np.ascontiguousarray(arrays["images"])), str(arrays["fingerprint"])
    if channels == 1:
        images, known = set_channels(images, 1), ""
    return ImageData(images, torch.from_numpy(arrays["labels"]).long(), list(PHOTOS), "textures", known)


def crop_places(split: str = "train", image_size: int | None = None, cache_dir: str | Path | None = None) -> np.ndarray:
    """[N, 4] (photo, scale, top, left) of each crop of ``split``, in the order of :func:`load_textures`."""
    arrays = _arrays(split, image_size, cache_dir)
    return np.concatenate([arrays["labels"][:, None].astype(np.float64), arrays["places"]], axis=1)
