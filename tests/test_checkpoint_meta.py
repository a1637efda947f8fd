"""What decides how a checkpoint is read (its image shape, class names, config and network) is vouched for by
its tensor file (whose SHA-256 the JSON records), and checked against the network the weights are loaded into
in checkpoints written before that: an edited JSON is exit 2 with one line naming the file, never other images."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file
from test_reliability import TINY, assert_refused, cli

from difflab.errors import CheckpointError
from difflab.runs.checkpoint import META_DIGEST, list_checkpoints, load_checkpoint, save_checkpoint, sha256_file


@pytest.fixture(scope="module")
def class_run(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("cls")
    rc, err = cli("train", *TINY, "--steps", "2", "--conditioning", "class", "--out", root / "run")
    assert rc == 0, err
    return root / "run"


def _copy(run: Path, tmp_path: Path, old: bool) -> tuple[Path, Path]:
    """A copy of ``run`` and its newest checkpoint JSON; ``old``: as written before the JSON was vouched for
    (no digest in the tensor file's header)."""
    dst = tmp_path / "run"
    shutil.copytree(run, dst)
    js = list_checkpoints(dst / "checkpoints")[-1]
    if old:
        st = js.with_suffix(".safetensors")
        save_file(load_file(str(st)), str(st))
        d = json.loads(js.read_text())
        d["sha256"] = sha256_file(st)
        js.write_text(json.dumps(d))
    return dst, js


def _edit(js: Path, drop: str | None = None, **changes) -> None:
    d = json.loads(js.read_text())
    d.update(changes)
    d.pop(drop, None)
    js.write_text(json.dumps(d))


def _sample(run: Path, tmp_path: Path, *extra) -> tuple:
    return ("sample", "--run", run, "--n", "2", "--steps", "1", "--out", tmp_path / "g.png", *extra)


EDITS = {
    "bigger-images": dict(image_shape=[1, 16, 16]),
    "huge-images": dict(image_shape=[1, 50000, 50000]),
    "three-channels": dict(image_shape=[3, 8, 8]),
    "short-shape": dict(image_shape=[8, 8]),
    "float-shape": dict(image_shape=[1, 8.0, 8]),
    "1000-classes": dict(class_names=[str(i) for i in range(1000)]),
    "number-names": dict(class_names=list(range(10))),
}


@pytest.mark.parametrize("old", [False, True], ids=["vouched", "old"])
@pytest.mark.parametrize("edit", EDITS)
def test_edited_shape_or_classes_is_one_line(class_run, tmp_path, edit, old):
    run, js = _copy(class_run, tmp_path, old)
    _edit(js, **EDITS[edit])
    line = assert_refused(run, *_sample(run, tmp_path, "--class", "5"))
    assert js.name in line and not (tmp_path / "g.png").exists()
    assert_refused(run, *_sample(run, tmp_path, "--class", "500"))


@pytest.mark.parametrize("old", [False, True], ids=["vouched", "old"])
def test_missing_config_with_an_edited_config_json_is_refused(class_run, tmp_path, old):
    run, js = _copy(class_run, tmp_path, old)
    _edit(js, drop="config")
    cfg = json.loads((run / "config.json").read_text())
    cfg["process"] = "cosine" if cfg.get("process") != "cosine" else "linear"
    (run / "config.json").write_text(json.dumps(cfg))
    assert_refused(run, *_sample(run, tmp_path), match="config")


@pytest.mark.parametrize("key,value", [("data_fingerprint", "0" * 16), ("network", {"kind": "unet"}),
                                       ("step", 3), ("world_size", 8)])
def test_any_edit_of_a_vouched_json_is_refused(class_run, tmp_path, key, value):
    run, js = _copy(class_run, tmp_path, old=False)
    _edit(js, **{key: value})
    line = assert_refused(run, *_sample(run, tmp_path))
    assert js.name in line


def test_old_checkpoints_still_load_and_new_ones_carry_the_digest(class_run, tmp_path):
    run, js = _copy(class_run, tmp_path, old=True)
    rc, err = cli(*_sample(run, tmp_path, "--class", "3"))
    assert rc == 0, err
    from safetensors import safe_open

    with safe_open(str(list_checkpoints(class_run / "checkpoints")[-1].with_suffix(".safetensors")), "pt") as f:
        assert len(f.metadata()[META_DIGEST]) == 64


def test_digest_survives_the_json_round_trip(tmp_path):
    import torch

    meta = {"image_shape": (1, 8, 8), "f": 0.1 + 0.2, "names": ["ä", "b"], "nested": {"b": 1, "a": [1.5e-300]}}
    js = save_checkpoint(tmp_path, 1, {"w": torch.ones(2)}, meta)
    assert load_checkpoint(js)[1]["f"] == 0.1 + 0.2
    _edit(js, f=0.3)
    with pytest.raises(CheckpointError, match="edited"):
        load_checkpoint(js)
    _edit(js, f=float("nan"))
    with pytest.raises(CheckpointError, match="edited"):
        load_checkpoint(js)
