"""difflab evaluate end to end on a tiny run (classifier features: fast and offline)."""

import json
import subprocess
import sys

import numpy as np
import pytest

from difflab.config import TrainConfig
from difflab.training.trainer import Trainer


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("evalrun") / "run"
    cfg = TrainConfig(data="digits", model="tiny", out=str(out), steps=4, batch_size=8, sample_every=0,
                      checkpoint_every=4, sample_steps=2)
    Trainer(cfg, progress=False, log=lambda *a: None).run()
    return out


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "difflab", *map(str, args)], capture_output=True, text=True,
                          timeout=600)


def test_evaluate_run_writes_every_metric(tiny_run, tmp_path):
    out = tmp_path / "eval.json"
    r = _cli("evaluate", "--run", tiny_run, "--n", 24, "--steps", 2, "--features", "classifier",
             "--json", out)
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    for key in ("fid", "kid", "kid_std", "precision", "recall", "n", "reference", "features"):
        assert key in res, key
    assert res["n"] == 24 and res["reference"] == "digits" and res["features"].startswith("classifier")
    assert res["fid"] > 0 and 0 <= res["precision"] <= 1
    assert any("biased" in w for w in res["warnings"])
    assert "fid" in r.stdout and "warning: FID from 24" in r.stdout


def test_evaluate_samples_file_and_errors(tmp_path, capsys):
    from difflab.cli import main
    from difflab.data import load

    real = load("digits", split="test").images[:30]
    path = tmp_path / "s.npz"
    np.savez(path, images=real.permute(0, 2, 3, 1).numpy(), labels=np.zeros(30, dtype=np.int64))
    r = _cli("evaluate", "--samples", path, "--data", "digits", "--features", "classifier",
             "--metrics", "fid,precision,recall", "--json", tmp_path / "e.json")
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "e.json").read_text())
    assert res["precision"] > 0.5  # real test digits lie on the manifold of the real digits
    bad = tmp_path / "bad.npz"
    np.savez(bad, images=np.zeros((3, 8, 8), dtype=np.float32))
    # the refusals in this process (a new interpreter costs seconds on a loaded machine; the first call
    # above is the end-to-end one)
    for args in (["--samples", bad, "--data", "digits"], ["--samples", tmp_path / "none.npz", "--data", "digits"],
                 ["--samples", path]):
        capsys.readouterr()
        rc = main(["evaluate", *map(str, args)])
        err = capsys.readouterr().err
        assert rc == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
