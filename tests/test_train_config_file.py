"""difflab train --config FILE.json: a saved config (or part of one) as the defaults, the flags win."""

from __future__ import annotations

import json

import pytest

from difflab.cli import build_parser, main
from difflab.cli.train import given_settings
from difflab.config import TrainConfig
from difflab.recipe import build_config


def _cfg(argv):
    args = build_parser("train").parse_args(["train", *argv])
    return build_config(given_settings(args))


def test_a_saved_config_is_the_run_again_with_the_flags_on_top(tmp_path):
    saved = TrainConfig(method="naive2", model="series-alg2", data="digits", steps=77, lr=2e-3, seed=4, hflip=True)
    (tmp_path / "config.json").write_text(json.dumps(saved.to_json()))
    cfg = _cfg(["--config", str(tmp_path / "config.json"), "--seed", "9", "--out", "runs/b"])
    # every file value kept (the method's own defaults do not replace them), the typed flags changed
    assert cfg.to_json() == {**saved.to_json(), "seed": 9, "out": "runs/b"}


def test_a_partial_config_fills_only_its_keys(tmp_path):
    (tmp_path / "part.json").write_text(json.dumps({"method": "naive2", "lr": 5e-4, "steps": 30}))
    cfg = _cfg(["--config", str(tmp_path / "part.json"), "--steps", "40"])
    plain = _cfg(["--method", "naive2", "--lr", "5e-4"])  # the same as typing the file's keys as flags
    assert cfg.to_json() == {**plain.to_json(), "steps": 40}


@pytest.mark.parametrize("content,why", [
    ({"stpes": 3, "seed": 1, "colour": "x"}, "unknown keys colour, stpes"),
    ({"steps": "3"}, "'steps' is \"3\", not a int"),
    ({"hflip": 1}, "'hflip' is 1, not a bool"),
    ([1, 2], "not a JSON object"),
    ({"process": "bogus"}, "--process must be one of"),
    ({"batch_size": 0}, "--batch-size"),
])
def test_bad_files_are_one_line_before_anything_runs(tmp_path, capsys, content, why):
    (tmp_path / "c.json").write_text(json.dumps(content))
    out = tmp_path / "run"
    code = main(["train", "--config", str(tmp_path / "c.json"), "--out", str(out), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and why in err, err
    assert not out.exists()


def test_unreadable_file_is_one_line(tmp_path, capsys):
    (tmp_path / "c.json").write_text("{not json")
    assert main(["train", "--config", str(tmp_path / "c.json"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot be read as JSON" in err, err


def test_train_from_a_config_file(tmp_path):
    part = {"data": "digits", "model": "tiny", "steps": 2, "batch_size": 8, "log_every": 1, "checkpoint_every": 2,
            "sample_every": 0, "sample_steps": 2, "warmup": 1, "out": str(tmp_path / "ignored")}
    (tmp_path / "c.json").write_text(json.dumps(part))
    out = tmp_path / "run"
    assert main(["train", "--config", str(tmp_path / "c.json"), "--out", str(out), "--steps", "3", "--quiet"]) == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["steps"] == 3 and saved["model"] == "tiny" and saved["log_every"] == 1
    assert not (tmp_path / "ignored").exists()
    # resuming with the run's own config.json changes nothing (the same values count as given)
    assert main(["train", "--config", str(out / "config.json"), "--resume", "--steps", "4", "--quiet"]) == 0
    assert json.loads((out / "config.json").read_text())["steps"] == 4
