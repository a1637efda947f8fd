"""Damaged or hostile diffusers folders: every bad config field is one line naming the file, in
``difflab sample --diffusers-model`` and in ``difflab.load(...).sample``, before anything is allocated, and no
file changes."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_interop import tiny_unet
from test_reliability import assert_refused, files

import difflab
from difflab.errors import UsageError

diffusers = pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("folder") / "m"
    tiny_unet().save_pretrained(root)
    diffusers.DDPMScheduler().save_pretrained(root)
    return root


def _edit(path: Path, **changes) -> None:
    d = json.loads(path.read_text())
    d.update(changes)
    path.write_text(json.dumps(d))


SCHEDULER_BAD = {
    "not-object": "[1]", "trained_betas-text": {"trained_betas": "abc"}, "beta_start-text": {"beta_start": "x"},
    "T-negative": {"num_train_timesteps": -5}, "T-huge": {"num_train_timesteps": 2e9},
    "T-huge-int": {"num_train_timesteps": 2 * 10**9}, "T-bool": {"num_train_timesteps": True},
    "beta-one": {"trained_betas": [1.0] * 1000}, "betas-short": {"trained_betas": [0.01] * 10},
    "betas-nested": {"trained_betas": [[0.1]] * 1000}, "beta_end-nan": {"beta_end": math.nan},
    "beta_end-inf": {"beta_end": math.inf}, "schedule-unknown": {"beta_schedule": "sigmoid"},
    "schedule-list": {"beta_schedule": ["linear"]}, "prediction-number": {"prediction_type": 3},
    "spacing-unknown": {"timestep_spacing": "sideways"}, "offset-negative": {"steps_offset": -1},
    "clip-range-zero": {"clip_sample_range": 0}, "clip-text": {"clip_sample": "yes"},
    "threshold-ratio": {"dynamic_thresholding_ratio": 2.0}, "variance-unknown": {"variance_type": "huge"},
    "binary": b"\xff\xfe\x00", "deep": "[" * 100_000 + "]" * 100_000, "big-int": '{"beta_start": ' + "9" * 5000 + "}",
}
UNET_BAD = {
    "not-object": "[1]", "size-text": {"sample_size": "ab"}, "size-huge": {"sample_size": 100000},
    "size-odd": {"sample_size": 7}, "size-list3": {"sample_size": [8, 8, 8]}, "size-zero": {"sample_size": 0},
    "channels-huge": {"block_out_channels": [8, 10**6]}, "channels-text": {"block_out_channels": "ab"},
    "layers-huge": {"layers_per_block": 10**6}, "in-channels-neg": {"in_channels": -1},
    "classes-text": {"num_class_embeds": "many"}, "blocks-mismatch": {"down_block_types": ["DownBlock2D"]},
    "other-shape": {"block_out_channels": [8, 32]}, "other-class": {"_class_name": "UNet2DConditionModel"},
    "class-as-list": {"_class_name": [1]}, "binary": b"\x00\x01",
}
N_FOLDER_CASES = len(SCHEDULER_BAD) + len(UNET_BAD)


def _damage(root: Path, name: str, change) -> None:
    path = root / name
    if isinstance(change, bytes):
        path.write_bytes(change)
    elif isinstance(change, str):
        path.write_text(change)
    else:
        _edit(path, **change)


def _check_both(root: Path, tmp_path: Path) -> None:
    before = files(root)
    line = assert_refused(root, "sample", "--diffusers-model", root, "--n", "1", "--steps", "2",
                          "--out", tmp_path / "g.png")
    assert str(root) in line and not (tmp_path / "g.png").exists()
    with pytest.raises(UsageError) as e:
        difflab.load(root).sample(1, steps=2)
    assert len(str(e.value).splitlines()) == 1 and str(root) in str(e.value)
    assert files(root) == before


@pytest.mark.parametrize("case", SCHEDULER_BAD)
def test_bad_scheduler_config_is_one_line(folder, tmp_path, case):
    root = tmp_path / "m"
    shutil.copytree(folder, root)
    _damage(root, "scheduler_config.json", SCHEDULER_BAD[case])
    _check_both(root, tmp_path)


@pytest.mark.parametrize("case", UNET_BAD)
def test_bad_unet_config_is_one_line(folder, tmp_path, case):
    root = tmp_path / "m"
    shutil.copytree(folder, root)
    _damage(root, "config.json", UNET_BAD[case])
    _check_both(root, tmp_path)


def test_valid_folder_still_samples(folder):
    assert tuple(difflab.load(folder).sample(1, steps=2).shape) == (1, 1, 8, 8)


_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-2**40, 2**40), st.floats(allow_subnormal=False),
                    st.text(max_size=6), st.lists(st.floats(0, 2, allow_subnormal=False), max_size=3))


@given(st.sampled_from(["num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                        "prediction_type", "clip_sample_range", "timestep_spacing", "steps_offset"]), _VALUES,
       st.sampled_from(["sample_size", "in_channels", "layers_per_block", "norm_num_groups", "num_class_embeds"]),
       _VALUES)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_fuzz_folder_fields(folder, tmp_path_factory, skey, svalue, ukey, uvalue):
    """Any value in a scheduler field and a UNet field: a correct sample or one line, no file changed."""
    tmp = tmp_path_factory.mktemp("fz")
    root = tmp / "m"
    shutil.copytree(folder, root)
    _edit(root / "scheduler_config.json", **{skey: svalue})
    _edit(root / "config.json", **{ukey: uvalue})
    before = files(root)
    try:
        images = difflab.load(root).sample(1, steps=2)
        assert tuple(images.shape[:2]) == (1, 1)
    except UsageError as e:
        assert len(str(e).splitlines()) == 1
    assert files(root) == before
