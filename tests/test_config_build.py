"""One config construction (issue 24, step 4): ``recipe.build_config`` makes a run's config once, from what the
user gave, and nothing changes it afterwards; ``train-classifier`` and ``train --method noisy-classifier`` give
the same config; MNIST is read once when padded."""

from __future__ import annotations

import copy
import dataclasses
import json

import numpy as np
import pytest
import torch

from difflab import recipe
from difflab.cli import build_parser
from difflab.cli import train_classifier as cli_classifier
from difflab.cli.train import given_settings
from difflab.config import TrainConfig, load_run_config, save_json
from difflab.errors import UsageError
from difflab.recipe import METHOD_DEFAULTS, build_config


def train_config(*argv) -> TrainConfig:
    return build_config(given_settings(build_parser("train").parse_args(["train", *map(str, argv)])))


def classifier_config(*argv) -> TrainConfig:
    return cli_classifier.config_of(build_parser("train-classifier").parse_args(["train-classifier", *map(str, argv)]))


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
    clf = train_config("--method", "noisy-classifier", "--precision", "auto", "--grad-clip", 0.5)
    assert (clf.precision, clf.grad_clip, clf.lr, clf.batch_size) == ("auto", 0.5, 1e-3, 128)
    # a --config file's keys count as given (the method's defaults do not replace them); the flags win over it
    (tmp_path / "c.json").write_text(json.dumps({"method": "naive1", "T": 20, "batch_size": 8}))
    cfg = train_config("--config", tmp_path / "c.json", "--batch-size", 2)
    assert (cfg.T, cfg.batch_size, cfg.k) == (20, 2, 32)


def test_the_default_process_is_flow_and_the_others_keep_their_recipe(tmp_path):
    """Flow (velocity, logit-normal times) is what a run gets with no flag, the same built or constructed; every
    other process predicts v at uniform times; other methods train at uniform times; a config.json written before
    these fields existed reads as the recipe of its day."""
    from difflab.config import PROCESSES, TrainConfig, load_run_config

    built = build_config({})
    assert (built.process, built.prediction, built.noise_sampling) == ("flow", "velocity", "logit-normal")
    assert built == TrainConfig()
    for name in PROCESSES:
        if name != "flow":
            cfg = build_config({"process": name})
            assert (cfg.prediction, cfg.noise_sampling) == ("v", "uniform"), name
    assert build_config({"process": "cosine", "prediction": "eps"}).prediction == "eps"
    # the sampler: the SDE for unconditional flow runs, the ODE's for guided ones and the other processes
    assert built.sampler == "dpmpp-2m-sde"
    assert build_config({"conditioning": "class"}).sampler == build_config({"conditioning": "text"}).sampler == "dpmpp-2m"
    assert build_config({"process": "cosine"}).sampler == "dpmpp-2m"
    assert build_config({"conditioning": "class", "sampler": "heun"}).sampler == "heun"
    for method in ("naive1", "naive2", "cold", "classifier", "noisy-classifier", "consistency"):
        assert build_config({"method": method}).noise_sampling == "uniform", method
    with pytest.raises(UsageError, match="apply to --method gaussian"):
        build_config({"method": "naive1", "noise_sampling": "lognormal"})
    run = tmp_path / "old"
    run.mkdir()
    old = {k: v for k, v in dataclasses.asdict(TrainConfig(out=str(run))).items()
           if k not in ("process", "prediction", "noise_sampling")}
    (run / "config.json").write_text(json.dumps(old))
    cfg = load_run_config(run)
    assert (cfg.process, cfg.prediction, cfg.noise_sampling) == ("cosine", "v", "uniform")
    (run / "config.json").write_text(json.dumps({k: v for k, v in old.items() if k != "sampler"}))
    assert load_run_config(run).sampler == "dpmpp-2m"


def test_config_json_round_trip(tmp_path):
    cfg = build_config({"method": "naive2", "data": "digits", "out": str(tmp_path), "seed": 3, "hflip": True,
                        "sample_sigma_min": 0.25})
    save_json(tmp_path / "config.json", cfg.to_json())
    assert load_run_config(tmp_path) == cfg
    assert build_config(cfg.to_json()) == cfg  # every setting given: the saved run again, no default replaces one


# --- train-classifier is train --method noisy-classifier --------------------------------------------------------
def test_train_classifier_and_train_noisy_classifier_give_the_same_config(tmp_path):
    out = tmp_path / "clf"
    assert classifier_config("--data", "digits", "--out", out) == \
        train_config("--method", "noisy-classifier", "--data", "digits", "--out", out)
    flags = ("--steps", 5, "--batch-size", 32, "--lr", 2e-3, "--process", "linear", "--T", 500, "--seed", 4,
             "--weight-decay", 0.0, "--warmup", 3, "--time-limit", 1.5, "--device", "cpu")
    clf = classifier_config("--data", "digits", "--out", out, "--channels", 16, *flags)
    assert clf == train_config("--method", "noisy-classifier", "--data", "digits", "--out", out,
                               "--channels-mult", "16,32,32", *flags)
    assert (clf.process, clf.T, clf.lr, clf.steps, clf.channels_mult) == ("linear", 500, 2e-3, 5, "16,32,32")
    # the defaults of both: the one classifier table
    plain = classifier_config("--data", "digits", "--out", out)
    assert {k: getattr(plain, k) for k in METHOD_DEFAULTS["noisy-classifier"]} == METHOD_DEFAULTS["noisy-classifier"]
    assert (plain.precision, plain.grad_clip, plain.lr, plain.weight_decay, plain.batch_size, plain.steps) == \
        ("fp32", 0.0, 1e-3, 0.05, 128, 2000)


def test_train_classifier_of_a_run_takes_its_data_and_process(tmp_path):
    run = tmp_path / "run"
    save_json(run / "config.json", TrainConfig(data="digits", process="sigmoid", T=300, image_size=16).to_json())
    cfg = classifier_config("--run", run, "--out", tmp_path / "clf", "--steps", 7)
    assert (cfg.method, cfg.data, cfg.process, cfg.T, cfg.image_size, cfg.steps) == \
        ("noisy-classifier", "digits", "sigmoid", 300, 16, 7)
    with pytest.raises(UsageError, match="--process goes with --data"):
        classifier_config("--run", run, "--out", tmp_path / "clf", "--process", "linear")
    with pytest.raises(UsageError, match="exactly one"):
        classifier_config("--out", tmp_path / "clf")
    with pytest.raises(UsageError, match="--channels must be at least 1"):
        classifier_config("--data", "digits", "--out", tmp_path / "clf", "--channels", 0)


# --- MNIST is read once when padded ------------------------------------------------------------------------------
@pytest.fixture
def mnist_reads(monkeypatch):
    """MNIST replaced by 12 numbered 28x28 images; the list counts the reads."""
    from difflab.data import mnist

    reads = []

    def fake(split="train", cache_dir=None):
        reads.append(split)
        images = (np.arange(12 * 28 * 28) % 251).astype(np.uint8).reshape(12, 1, 28, 28)
        return {"images": images, "labels": np.arange(12, dtype=np.int64) % 10}

    monkeypatch.setattr(mnist, "load_mnist", fake)
    return reads


def test_padded_mnist_is_read_once(mnist_reads):
    from difflab.data import load
    from difflab.runs.data import load_data, load_fitted, open_data

    expected = load("mnist", pad_to=32)
    mnist_reads.clear()
    data = load_data(TrainConfig(data="mnist"))
    assert mnist_reads == ["train"]
    assert data.shape == (1, 32, 32) and torch.equal(data.images, expected.images)
    assert torch.equal(data.labels, expected.labels) and data.fingerprint == expected.fingerprint
    assert open_data(TrainConfig(data="mnist", image_channels=3)).shape == (3, 32, 32)
    assert mnist_reads == ["train", "train"]
    assert torch.equal(load_fitted("mnist", "test", (1, 32, 32)).images, expected.images)
    assert mnist_reads == ["train", "train", "test"]
