"""difflab train --logger tensorboard: the loss.csv numbers and the sample grids, read back as events."""

from __future__ import annotations

import csv
import io
import sys

import numpy as np
import pytest
from PIL import Image

from difflab.cli import main
from difflab.config import TrainConfig
from difflab.training.trainer import Trainer


def _cfg(out, **kw):
    return TrainConfig(**{**dict(data="digits", out=str(out), model="tiny", steps=4, batch_size=8, log_every=2,
                                 checkpoint_every=4, sample_every=2, sample_steps=2, warmup=1, lr=1e-3,
                                 precision="fp32"), **kw})


def test_tensorboard_events_hold_the_csv_rows_and_the_grids(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    Trainer(_cfg(out, logger="tensorboard"), progress=False, log=lambda *a: None).run()
    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    assert set(acc.Tags()["scalars"]) == {"train/loss", "train/lr", "train/images_per_second"}
    with open(out / "loss.csv") as f:
        rows = list(csv.DictReader(f))
    for tag, col in [("train/loss", "loss"), ("train/lr", "lr"), ("train/images_per_second", "images_per_second")]:
        events = acc.Scalars(tag)
        assert [e.step for e in events] == [int(r["step"]) for r in rows] == [2, 4]
        # the CSV rounds (6 significant digits for the loss, 3 for lr, 0.1 img/s); events keep float32
        assert events[0].value == pytest.approx(float(rows[0][col]), rel=2e-3, abs=0.06)
    images = acc.Images("samples")
    assert [e.step for e in images] == [2, 4]  # the periodic grid and the final one
    final = np.asarray(Image.open(out / "samples" / "final.png"))[::2, ::2]  # the PNG is upscaled 2x
    got = np.asarray(Image.open(io.BytesIO(images[-1].encoded_image_string)).convert("L"))
    assert got.shape == final.shape and np.array_equal(got, final)


def test_csv_logger_writes_no_events(tmp_path):
    out = tmp_path / "run"
    Trainer(_cfg(out, steps=2, sample_every=0), progress=False, log=lambda *a: None).run()
    assert (out / "loss.csv").exists() and not (out / "tensorboard").exists()


def test_missing_tensorboard_is_one_line_before_training(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import tensorboard raises ImportError
    out = tmp_path / "run"
    code = main(["train", "--data", "digits", "--model", "tiny", "--steps", "2", "--out", str(out),
                 "--logger", "tensorboard", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "pip install 'difflab[tensorboard]'" in err, err
    assert not out.exists()


def test_logger_may_change_on_resume(tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    Trainer(_cfg(out, steps=2, sample_every=0, checkpoint_every=2), progress=False, log=lambda *a: None).run()
    Trainer(_cfg(out, steps=4, sample_every=0, checkpoint_every=2, logger="tensorboard"), resume=True,
            progress=False, log=lambda *a: None).run()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == [4]


def test_tensorboard_rows_before_the_checkpoint_survive_a_resume(tmp_path):
    """A run killed after its step-2 checkpoint (rows 1..4 written) resumes at 2: TensorBoard keeps rows 1 and 2
    from the first run and shows 3 and 4 once, from the resumed one, as loss.csv does."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from difflab.runs.checkpoint import list_checkpoints

    out = tmp_path / "run"
    kw = dict(steps=4, log_every=1, checkpoint_every=2, keep=5, sample_every=1, logger="tensorboard")
    Trainer(_cfg(out, **kw), progress=False, log=lambda *a: None).run()
    for path in list_checkpoints(out / "checkpoints")[1:]:  # as if killed before the step-4 checkpoint
        for f in out.joinpath("checkpoints").glob(path.stem + ".*"):
            f.unlink()
    Trainer(_cfg(out, **kw), resume=True, progress=False, log=lambda *a: None).run()
    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    with open(out / "loss.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    for tag, col in [("train/loss", "loss"), ("train/lr", "lr")]:
        events = acc.Scalars(tag)
        assert [e.step for e in events] == [1, 2, 3, 4], tag
        for e, r in zip(events, rows):
            assert e.value == pytest.approx(float(r[col]), rel=2e-3)
    assert [e.step for e in acc.Images("samples")] == [1, 2, 3, 4]
