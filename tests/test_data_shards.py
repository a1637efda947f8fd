"""Packed sets (difflab pack): written from any source, read by index with pread (nothing of the set mapped
into the process), trained on with --data DIR, and an index file that lies is refused with one line."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from difflab.cli import main
from difflab.config import TrainConfig
from difflab.data import ImageData, load, open_source
from difflab.data.shards import INDEX, ShardSource, ShardWriter, pack
from difflab.errors import DataError
from difflab.training.trainer import Trainer


@pytest.fixture(scope="module")
def digits() -> ImageData:
    d = load("digits").subset(50)
    return ImageData(d.images, d.labels, d.class_names, d.name, captions=[f"digit {k}" for k in d.labels.tolist()])


def test_pack_round_trip_over_several_shards(tmp_path: Path, digits: ImageData) -> None:
    index = pack(digits, tmp_path / "p", batch=16, shard_images=7)
    assert index.name == INDEX and len(list((tmp_path / "p").glob("images-*.npy"))) == 8  # 7 x 7 + 1
    src = open_source(tmp_path / "p")
    assert isinstance(src, ShardSource) and len(src) == 50 and src.shape == (1, 8, 8)
    idx = [49, 0, 6, 7, 13, 14, 49]
    assert torch.equal(src.read(idx), digits.images[idx])
    assert torch.equal(src.labels, digits.labels) and src.class_names == digits.class_names
    assert src.captions == digits.captions and src.num_classes == 10
    assert src.fingerprint == digits.fingerprint  # the same pixels and labels: the same fingerprint
    whole = load(tmp_path / "p")
    assert torch.equal(whole.images, digits.images) and whole.fingerprint == digits.fingerprint
    assert load(tmp_path / "p", image_size=4).shape == (1, 4, 4)
    with pytest.raises(DataError, match="packed at 1x8x8: --image-size 16 needs it packed again"):
        open_source(tmp_path / "p", image_size=16)
    with pytest.raises(IndexError):
        src.read([50])


def test_reading_maps_nothing_and_a_shard_cut_short_is_one_line(tmp_path: Path, digits: ImageData) -> None:
    pack(digits, tmp_path / "p", batch=16, shard_images=7)
    src = open_source(tmp_path / "p")
    fresh = open_source(tmp_path / "p")  # checked, then (below) a shard swapped for a FIFO before its first read
    assert torch.equal(src.read([3, 48, 20]), digits.images[[3, 48, 20]])
    maps = Path("/proc/self/maps")
    if maps.exists():  # the set's pages stay in the page cache, never in the process (bounded footprint)
        assert "images-" not in maps.read_text()
    shard = tmp_path / "p" / "images-00006.npy"  # images 42..48
    shard.write_bytes(shard.read_bytes()[:-64])
    assert torch.equal(src.read([47]), digits.images[[47]])
    with pytest.raises(DataError, match="images-00006.npy is shorter than its header says"):
        src.read([48])
    (tmp_path / "p" / "images-00000.npy").unlink()
    os.mkfifo(tmp_path / "p" / "images-00000.npy")
    with pytest.raises(DataError, match="images-00000.npy: not a regular file"):
        fresh.read([0])


def test_an_unfinished_pack_is_not_a_packed_set(tmp_path: Path, digits: ImageData) -> None:
    w = ShardWriter(tmp_path / "p", (1, 8, 8), 50)
    w.add(digits.images[:10])
    with pytest.raises(DataError, match="10 images written of the 50"):
        w.finish("x")
    assert not (tmp_path / "p" / INDEX).exists()
    with pytest.raises(DataError, match="expected uint8 images of shape"):
        w.add(digits.images[:2].float())


def _index(folder: Path) -> dict:
    return json.loads((folder / INDEX).read_text())


@pytest.mark.parametrize("change, message", [
    (lambda i: i.update(format="other"), "format"),
    (lambda i: i.update(version=99), "version 99"),
    (lambda i: i.update(shape=[2, 8, 8]), "shape"),
    (lambda i: i.update(shape=[1, 8, 9]), "shape"),
    (lambda i: i.update(count=51), "hold 50 images, the index says 51"),
    (lambda i: i["shards"][0].update(file="../outside.npy"), "not a plain .npy name"),
    (lambda i: i["shards"][0].update(file="/etc/passwd"), "not a plain .npy name"),
    (lambda i: i["shards"][0].update(file="missing.npy"), "missing.npy is missing"),
    (lambda i: i["shards"][0].update(count=3), r"holds uint8 \(7, 1, 8, 8\), expected uint8 \(3, 1, 8, 8\)"),
    (lambda i: i.update(class_names=["a"]), "labels must lie in 0..0"),
    (lambda i: i.update(fingerprint="../../x"), "fingerprint"),
    (lambda i: i.update(shards="all"), "shards must be a non-empty list"),
    (lambda i: i.update(captions="labels.npy"), "not a plain .json name"),
])
def test_a_lying_index_is_refused_with_one_line(tmp_path: Path, digits: ImageData, change, message) -> None:
    pack(digits, tmp_path / "p", shard_images=7)
    index = _index(tmp_path / "p")
    change(index)
    (tmp_path / "p" / INDEX).write_text(json.dumps(index))
    with pytest.raises(DataError, match=message) as e:
        ShardSource(tmp_path / "p")
    assert "\n" not in str(e.value) and "difflab pack" in str(e.value)


def test_broken_index_and_pickled_shard_are_refused(tmp_path: Path, digits: ImageData) -> None:
    pack(digits, tmp_path / "p", shard_images=50)
    (tmp_path / "p" / INDEX).write_bytes(b"\xff{not json")
    with pytest.raises(DataError, match="not a valid packed data set"):
        open_source(tmp_path / "p")
    pack(digits, tmp_path / "q", shard_images=50)
    np.save(tmp_path / "q" / "images-00000.npy", np.array([object()] * 50), allow_pickle=True)
    with pytest.raises(DataError, match="images-00000.npy"):
        open_source(tmp_path / "q")


def test_cli_pack_then_train_on_the_packed_set(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["pack", "digits", "--out", str(tmp_path / "d")]) == 0
    assert "1500 images 1x8x8, 10 classes" in capsys.readouterr().out
    assert main(["pack", "digits", "--out", str(tmp_path / "d")]) == 2
    assert "already holds a packed set; pass --force" in capsys.readouterr().err
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "mine.txt").write_text("x")
    assert main(["pack", "digits", "--out", str(tmp_path / "other")]) == 2
    cfg = TrainConfig(data=str(tmp_path / "d"), out=str(tmp_path / "run"), model="tiny", steps=3, batch_size=8,
                      log_every=1, checkpoint_every=3, sample_every=0, sample_steps=2, conditioning="class")
    tr = Trainer(cfg, progress=False, log=lambda *a: None)
    assert isinstance(tr.data, ShardSource) and tr.loader.streamed
    assert tr.run().step == 3
