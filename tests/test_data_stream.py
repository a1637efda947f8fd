"""Large folders stream: listed without decoding, decoded batch by batch in the loader's workers, and a
streamed run trains and resumes exactly like one in memory."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from difflab.config import TrainConfig
from difflab.data import ImageData, load, open_source
from difflab.data import folder as folder_module
from difflab.data.folder import FolderSource
from difflab.errors import DataError
from difflab.runs.checkpoint import latest_checkpoint
from difflab.training.trainer import Trainer

QUIET = dict(progress=False, log=lambda *a: None)


def _pets(root: Path, n: int = 24, size: int = 8) -> Path:
    rng = np.random.default_rng(0)
    for k in range(n):
        a = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        path = root / ("cat" if k % 3 else "dog") / f"{k:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(a).save(path)
    return root


@pytest.fixture
def streaming(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(folder_module, "STREAM_FROM", 10)


def test_a_large_folder_streams_the_pixels_of_the_in_memory_one(tmp_path: Path, streaming) -> None:
    root = _pets(tmp_path / "pets")
    src = open_source(root, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists()  # nothing decoded, nothing cached
    mem = load(root, cache_dir=tmp_path / "cache")
    assert isinstance(src, FolderSource) and isinstance(mem, ImageData)
    assert (len(src), src.shape, src.class_names, src.num_classes) == (24, (3, 8, 8), ["cat", "dog"], 2)
    assert torch.equal(src.labels, mem.labels) and src.captions is None
    assert torch.equal(src.read([5, 0, 23]), mem.images[[5, 0, 23]])
    assert open_source(root, image_size=4, channels=1).shape == (1, 4, 4)
    assert open_source(root).fingerprint == src.fingerprint != open_source(root, image_size=4).fingerprint
    assert isinstance(open_source(root, stream=False), ImageData)


def test_a_streamed_file_that_breaks_is_replaced_by_the_next(tmp_path: Path, streaming) -> None:
    root = _pets(tmp_path / "pets")
    src = open_source(root)
    want = src.read([1])
    (root / "cat" / "001.png").write_bytes(b"\x89PNG broken after indexing")
    with pytest.warns(UserWarning, match=r"skipped unreadable image file cat/001\.png"):
        got = src.read([0])  # cat/001.png is the first file; cat/002.png follows it
    assert torch.equal(got, want)


def test_a_streamed_folder_needs_one_square_size_or_image_size(tmp_path: Path, streaming) -> None:
    root = _pets(tmp_path / "pets")
    Image.new("RGB", (8, 6)).save(root / "cat" / "000.png")
    with pytest.raises(DataError, match="not all square.*--image-size"):
        open_source(root)
    assert open_source(root, image_size=6).shape == (3, 6, 6)


def test_a_streamed_folder_trains_and_resumes_bit_identically(tmp_path: Path, streaming) -> None:
    root = _pets(tmp_path / "pets", n=30)

    def cfg(name: str, **kw) -> TrainConfig:
        base = dict(data=str(root), out=str(tmp_path / name), model="tiny", steps=6, batch_size=8, log_every=2,
                    checkpoint_every=3, sample_every=0, sample_steps=2, warmup=2, lr=1e-3, conditioning="class")
        return TrainConfig(**{**base, **kw})

    full = Trainer(cfg("full"), **QUIET)
    assert isinstance(full.data, FolderSource) and full.loader.streamed
    full.run()
    Trainer(cfg("half", steps=3), **QUIET).run()  # 24 images: step 3 is in the middle of the first epoch
    Trainer(cfg("half"), resume=True, **QUIET).run()
    a, meta = latest_checkpoint(tmp_path / "full" / "checkpoints")
    b, _ = latest_checkpoint(tmp_path / "half" / "checkpoints")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert meta["data_fingerprint"] == full.data.fingerprint and meta["class_names"] == ["cat", "dog"]
