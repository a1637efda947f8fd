"""The built-in textures set: crops of scikit-image's bundled photos (difflab.data.textures)."""

import importlib.util

import pytest
import torch

from difflab.data import load, textures
from difflab.errors import DataError

pytestmark = pytest.mark.skipif(importlib.util.find_spec("skimage") is None, reason="needs scikit-image")

TRAIN = len(textures.PHOTOS) * len(textures.SCALES) * textures.TRAIN_PER_SCALE
TEST = len(textures.PHOTOS) * len(textures.SCALES) * textures.TEST_PER_SCALE


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("textures-cache")


def test_sizes_labels_and_splits(cache):
    train, test = load("textures", cache_dir=cache), load("textures", split="test", cache_dir=cache)
    assert train.images.shape == (TRAIN, 3, 32, 32) and test.images.shape == (TEST, 3, 32, 32)
    assert (TRAIN, TEST) == (4080, 504)
    assert train.class_names == list(textures.PHOTOS) and train.name == "textures"
    assert torch.equal(train.labels.bincount(), torch.full((8,), TRAIN // 8))
    assert torch.equal(test.labels.bincount(), torch.full((8,), TEST // 8))
    assert train.images.float().std() > 30  # photos, not flat colour
    small = load("textures", split="test", image_size=16, channels=1, cache_dir=cache)
    assert small.images.shape == (TEST, 1, 16, 16)


def test_splits_never_share_a_crop(cache):
    places = {tuple(p) for p in textures.crop_places("train", cache_dir=cache)}
    held = {tuple(p) for p in textures.crop_places("test", cache_dir=cache)}
    assert len(places) == TRAIN and len(held) == TEST and not places & held
    train, test = load("textures", cache_dir=cache).images, load("textures", split="test", cache_dir=cache).images
    flat_train = {bytes(x) for x in train.reshape(len(train), -1).numpy()}
    assert not any(bytes(x) in flat_train for x in test.reshape(len(test), -1).numpy())


def test_deterministic_whatever_the_cache(tmp_path):
    one = load("textures", split="test", image_size=8, cache_dir=tmp_path / "a")  # decoded afresh twice
    two = load("textures", split="test", image_size=8, cache_dir=tmp_path / "b")
    assert torch.equal(one.images, two.images) and one.fingerprint == two.fingerprint
    cached = load("textures", split="test", image_size=8, cache_dir=tmp_path / "a")  # read back from the cache
    assert torch.equal(cached.images, one.images) and cached.fingerprint == one.fingerprint


def test_missing_scikit_image_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(DataError, match="pip install scikit-image") as e:
        load("textures", cache_dir=tmp_path)
    assert "\n" not in str(e.value)
    with pytest.raises(DataError, match="unknown split"):
        textures.load_textures("valid")
