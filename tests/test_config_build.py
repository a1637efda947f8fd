"""One config construction (issue 24, step 4): ``recipe.build_config`` makes a run's config once, from what the
user gave, and nothing changes it afterwards."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch

from difflab import recipe
from difflab.cli import build_parser
from difflab.cli.train import given_settings
from difflab.config import TrainConfig, load_run_config, save_json
from difflab.errors import UsageError
from difflab.recipe import build_config


def train_config(*argv) -> TrainConfig:
    return build_config(given_settings(build_parser("train").parse_args(["train", *map(str, argv)])))


# --- build_config: pure, checked once, the given settings win ---------------------------------------------------
def test_build_config_is_pure():
    values = {"method": "naive1", "steps": 5, "lr": None, "data": "digits"}
    before = copy.deepcopy(values)
    a, b = build_config(values), build_config(values)
    assert a == b and a is not b
    assert values == before  # the input is left as it was
    assert (a.T, a.k, a.lr, a.steps) == (60, 32, 3e-4, 5)  # None: not given, so the method's lr


def test_a_config_is_checked_once_as_it_is_made_and_never_changed(monkeypatch):
    calls = []
    real = TrainConfig.validate
    monkeypatch.setattr(TrainConfig, "validate", lambda self: calls.append(1) or real(self))
    cfg = build_config({"method": "naive2", "steps": 3})
    assert len(calls) == 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.lr = 1e-2
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg._given = {"lr"}  # no undeclared attributes either
    with pytest.raises(UsageError, match="--batch-size"):
        TrainConfig(batch_size=0)  # an invalid config cannot be made
    with pytest.raises(UsageError, match="unknown training setting 'stpes'"):
        build_config({"stpes": 3})


def test_resolve_returns_a_new_config(monkeypatch):
    monkeypatch.setattr(recipe, "_cpu_flags", lambda: frozenset())
    cfg = build_config({"data": "digits"})
    resolved = recipe.resolve(cfg, torch.device("cpu"), 1000)
    assert (cfg.lr, cfg.precision) == (0.0, "auto")  # left as it was
    assert resolved == dataclasses.replace(cfg, lr=recipe.LR_SMALL, precision="fp32")


def test_explicit_settings_win_over_method_and_process_defaults(tmp_path):
    cfg = train_config("--method", "naive1", "--T", 8, "--batch-size", 4)
    assert (cfg.T, cfg.batch_size, cfg.k, cfg.warmup) == (8, 4, 32, 63)  # typed, typed, then naive1's own
    flow = train_config("--process", "flow", "--noise-sampling", "uniform")
    assert (flow.prediction, flow.noise_sampling) == ("velocity", "uniform")
    # a --config file's keys count as given (the method's defaults do not replace them); the flags win over it
    (tmp_path / "c.json").write_text(json.dumps({"method": "naive1", "T": 20, "batch_size": 8}))
    cfg = train_config("--config", tmp_path / "c.json", "--batch-size", 2)
    assert (cfg.T, cfg.batch_size, cfg.k) == (20, 2, 32)


def test_config_json_round_trip(tmp_path):
    cfg = build_config({"method": "naive2", "data": "digits", "out": str(tmp_path), "seed": 3, "hflip": True,
                        "sample_sigma_min": 0.25})
    save_json(tmp_path / "config.json", cfg.to_json())
    assert load_run_config(tmp_path) == cfg
    assert build_config(cfg.to_json()) == cfg  # every setting given: the saved run again, no default replaces one
