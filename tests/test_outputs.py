"""difflab sample --out-dir / --trajectory, and evaluate --samples reading such a folder."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from difflab.cli import main
from difflab.config import TrainConfig
from difflab.outputs import read_sample_pngs
from difflab.training.trainer import Trainer


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("outputs") / "run"
    cfg = TrainConfig(data="digits", out=str(out), model="tiny", steps=4, batch_size=8, log_every=2,
                      checkpoint_every=4, sample_every=0, sample_steps=2, warmup=1)
    Trainer(cfg, progress=False, log=lambda *a: None).run()
    return out


def test_out_dir_pngs_match_the_npz_and_carry_settings(run, tmp_path):
    args = ["sample", "--run", str(run), "--n", "5", "--steps", "3", "--seed", "4", "--out", str(tmp_path / "g.png")]
    assert main(args + ["--out-dir", str(tmp_path / "pngs"), "--save-npz", str(tmp_path / "s.npz"),
                        "--trajectory", str(tmp_path / "path.gif")]) == 0
    names = sorted(p.name for p in (tmp_path / "pngs").iterdir())
    assert names == [f"{i:06d}.png" for i in range(5)]
    npz = torch.from_numpy(np.load(tmp_path / "s.npz")["images"]).permute(0, 3, 1, 2)
    assert torch.equal(read_sample_pngs(tmp_path / "pngs"), npz)
    meta = json.loads(Image.open(tmp_path / "pngs" / "000003.png").text["difflab"])
    assert meta["index"] == 3 and meta["seed"] == 4 and meta["steps"] == 3
    gif = Image.open(tmp_path / "path.gif")
    assert gif.n_frames >= 2  # the steps differ (PIL merges identical neighbouring frames)


def test_out_dir_refuses_other_files_unless_forced(run, tmp_path, capsys):
    (tmp_path / "pngs").mkdir()
    (tmp_path / "pngs" / "notes.txt").write_text("mine")
    args = ["sample", "--run", str(run), "--n", "2", "--steps", "2", "--out-dir", str(tmp_path / "pngs")]
    assert main(args) == 2 and "--force" in capsys.readouterr().err
    assert (tmp_path / "pngs" / "notes.txt").read_text() == "mine"
    assert main(args + ["--force"]) == 0 and (tmp_path / "pngs" / "000001.png").exists()
