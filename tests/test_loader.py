"""difflab.data.loader: the data order is a pure function of (seed, step, rank), streamed sources are read
by worker processes in that order, and a resumed run is bit-identical to an uninterrupted one."""

from __future__ import annotations

from pathlib import Path

import torch

from difflab.config import TrainConfig
from difflab.data import ImageData, load
from difflab.data.loader import BatchLoader, BatchOrder
from difflab.data.source import ImageSource, StreamedSource
from difflab.runs.checkpoint import latest_checkpoint
from difflab.training.trainer import Trainer

QUIET = dict(progress=False, log=lambda *a: None)


class Streamed(StreamedSource):
    """An in-memory set seen as a streamed source: the loader reads it in worker processes."""

    def __init__(self, data: ImageData):
        self.data, self.shape, self.name = data, data.shape, data.name
        self.labels, self.class_names, self.captions = data.labels, data.class_names, None
        self.fingerprint = data.fingerprint

    def __len__(self) -> int:
        return len(self.data)

    def read(self, indices):
        return self.data.read(indices)


def test_sources_meet_the_protocol() -> None:
    d = load("digits").subset(20)
    assert isinstance(d, ImageSource) and isinstance(Streamed(d), ImageSource)
    s = Streamed(d)
    assert (s.shape, s.channels, s.height, s.width, s.num_classes) == (d.shape, 1, 8, 8, 10)
    assert torch.equal(d.read([3, 1]), d.images[[3, 1]])


def test_order_is_a_permutation_per_epoch_and_ranks_split_the_batch() -> None:
    one = BatchOrder(10, seed=3, batch_size=4)
    seen = torch.cat([one.indices(b, 0) for b in range(5)])  # 20 positions: two whole epochs
    assert sorted(seen[:10].tolist()) == list(range(10)) and sorted(seen[10:].tolist()) == list(range(10))
    assert torch.equal(seen[:10], torch.randperm(10, generator=torch.Generator().manual_seed(3 * 100_003)))
    # two ranks with two micro-batches each: in (micro, rank) order they are the global batch
    parts = [BatchOrder(10, 3, 4, grad_accum=2, world=2, rank=r) for r in (0, 1)]
    for b in range(5):
        split = torch.cat([parts[r].indices(b, m) for m in (0, 1) for r in (0, 1)])
        assert torch.equal(split, one.indices(b, 0))
    assert [parts[1].first_position(m) for m in (0, 1)] == [1, 3]


def test_streamed_loader_matches_in_memory_and_restarts_anywhere() -> None:
    d = load("digits").subset(37)
    order = BatchOrder(len(d), seed=1, batch_size=8, grad_accum=2)
    memory = BatchLoader(d, order, lambda s: s, torch.device("cpu"), grad_accum=2)
    streamed = BatchLoader(Streamed(d), BatchOrder(len(d), 1, 8, 2), lambda s: s, torch.device("cpu"), 2, workers=2)
    assert memory.workers == 0 and streamed.workers == 2
    keys = [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (7, 1), (8, 0), (3, 0)]  # jumps restart the workers
    for step, micro in keys:
        a, la, ia = memory.get(step, micro)
        b, lb, ib = streamed.get(step, micro)
        assert torch.equal(ia, ib) and torch.equal(a, b) and torch.equal(la, lb) and torch.equal(a, d.images[ia])
        assert a.shape == (4, 1, 8, 8)
    streamed.close()


def _cfg(out: Path, **kw) -> TrainConfig:
    base = dict(data="digits", out=str(out), model="tiny", steps=10, batch_size=16, log_every=2, checkpoint_every=5,
                sample_every=0, sample_steps=2, warmup=2, lr=1e-3, hflip=True)
    return TrainConfig(**{**base, **kw})


def test_mid_epoch_resume_of_a_streamed_source_is_bit_identical(tmp_path: Path) -> None:
    data = Streamed(load("digits").subset(36))  # 16 images a step: step 5 (80 images) is in the middle of epoch 3
    Trainer(_cfg(tmp_path / "full"), data=data, **QUIET).run()
    Trainer(_cfg(tmp_path / "half", steps=5), data=data, **QUIET).run()
    Trainer(_cfg(tmp_path / "half"), resume=True, data=data, **QUIET).run()
    a, ma = latest_checkpoint(tmp_path / "full" / "checkpoints")
    b, mb = latest_checkpoint(tmp_path / "half" / "checkpoints")
    assert ma["step"] == mb["step"] == 10 and a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the in-memory path trains on the same batches: the same weights
    Trainer(_cfg(tmp_path / "memory"), data=data.data, **QUIET).run()
    c, _ = latest_checkpoint(tmp_path / "memory" / "checkpoints")
    assert all(torch.equal(a[k], c[k]) for k in a)


def test_random_crops_are_a_pure_function_of_seed_step_and_position() -> None:
    from difflab.data.augment import RandomCrops, larger_size

    assert larger_size(32, 0.125) == 36 and larger_size(8, 0.01) == 9
    big = torch.arange(6 * 10 * 10, dtype=torch.int64).remainder(251).to(torch.uint8).reshape(6, 1, 10, 10)
    crops = RandomCrops(ImageData(big, None, None, "big"), 8)
    assert crops.shape == (1, 8, 8) and torch.equal(crops.read([2]), big[2:3, :, 1:9, 1:9])  # centre crops
    seeds = torch.arange(6)
    a, again, later = crops.crop(big, seeds, 3), crops.crop(big, seeds, 3), crops.crop(big, seeds, 4)
    assert torch.equal(a, again) and not torch.equal(a, later) and a.shape == (6, 1, 8, 8)
    offsets = set()
    for i in range(6):  # every crop is a window of its own image
        found = [(y, x) for y in range(3) for x in range(3) if torch.equal(a[i], big[i, :, y:y + 8, x:x + 8])]
        assert len(found) == 1
        offsets.add(found[0])
    assert len(offsets) > 1


def test_a_cropped_run_trains_at_its_size_and_resumes_bit_identically(tmp_path: Path) -> None:
    full = Trainer(_cfg(tmp_path / "full", crop=0.25), **QUIET)
    assert full.shape == (1, 8, 8) and full.data.source.shape == (1, 10, 10)
    x, _, _ = full.batch(0, 0)
    assert x.shape == (16, 1, 8, 8)
    full.run()
    Trainer(_cfg(tmp_path / "half", crop=0.25, steps=5), **QUIET).run()
    Trainer(_cfg(tmp_path / "half", crop=0.25), resume=True, **QUIET).run()
    a, meta = latest_checkpoint(tmp_path / "full" / "checkpoints")
    b, _ = latest_checkpoint(tmp_path / "half" / "checkpoints")
    assert all(torch.equal(a[k], b[k]) for k in a) and meta["image_shape"] == [1, 8, 8]
