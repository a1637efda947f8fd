"""The data-following grid bottom (difflab.runs.grid_bottom): exact on Gaussian data, stored with the run, read as
the default of --sample-sigma-min auto."""

import json
import math

import pytest
import torch

from difflab.analytic import GaussianDataNet
from difflab.config import TrainConfig, add_config_arguments, flags_given
from difflab.data import ImageData
from difflab.denoiser import Denoiser
from difflab.errors import CheckpointError, UsageError
from difflab.processes.continuous import VE
from difflab.recipe import build_config
from difflab.runs import grid_bottom

pytestmark = pytest.mark.usefixtures("one_thread")


def exact_errors(std: float) -> list[float]:
    """The exact denoiser's x0 error over the data variance for N(mu, std^2 I): sigma^2 / (std^2 + sigma^2)."""
    return [s * s / (std * std + s * s) for s in grid_bottom.SIGMAS]


@pytest.mark.parametrize("std, k", [(0.5, 8), (0.3, 10), (1.0, 4)])
def test_gaussian_data_gives_the_exact_level(std, k):
    # the fraction whose exact crossing lies half-way between grid levels k and k + 1 (in log sigma)
    crossing = math.sqrt(grid_bottom.SIGMAS[k] * grid_bottom.SIGMAS[k + 1])
    fraction = crossing**2 / (std**2 + crossing**2)
    process = VE(0.002, 80.0)
    denoiser = Denoiser(GaussianDataNet(process, mean=0.2, std=std), process, "eps")
    x = 0.2 + std * torch.randn(128, 3, 16, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    measured = grid_bottom.relative_errors(denoiser, x)
    exact = exact_errors(std)
    for m, e in zip(measured, exact):
        assert m == pytest.approx(e, rel=0.02)  # 98k pixel values: the sample moments are within 2%
    # the rule's level is the largest grid level under std sqrt(f / (1 - f)), from the measured or exact errors
    assert std * math.sqrt(fraction / (1 - fraction)) == pytest.approx(crossing)
    want = grid_bottom.SIGMAS[k]
    assert grid_bottom.choose(grid_bottom.SIGMAS, exact, fraction) == want
    assert grid_bottom.measure(denoiser, x, fraction=fraction)["sigma_min"] == want


def test_choose_stops_at_the_first_crossing():
    sigmas = [0.1, 0.2, 0.4, 0.8]
    assert grid_bottom.choose(sigmas, [0.01, 0.02, 0.05, 0.03], 0.04) == 0.2  # a dip above the crossing is noise
    assert grid_bottom.choose(sigmas, [0.05, 0.06, 0.07, 0.08], 0.04) == 0.0  # the process's own bottom
    assert grid_bottom.choose(sigmas, [0.0, 0.0, 0.0, 0.0], 0.04) == 0.8


def test_stored_measurement_and_the_default(tmp_path):
    assert grid_bottom.run_bottom(tmp_path, "auto") == grid_bottom.FALLBACK  # no measurement yet
    assert grid_bottom.run_bottom(tmp_path, 0.3) == 0.3  # a number given wins
    result = {"sigma_min": 0.42, "fraction": 0.04, "step": 7, "n": 64, "seed": 0, "sigmas": [0.1], "errors": [0.01]}
    grid_bottom.save(tmp_path, result)
    assert grid_bottom.load(tmp_path) == result and grid_bottom.run_bottom(tmp_path, "auto") == 0.42
    assert grid_bottom.run_bottom(tmp_path, 0.0) == 0.0
    path = tmp_path / grid_bottom.FILE
    for text in ("{", "[]", '{"sigma_min": -1, "sigmas": [], "errors": []}', '{"sigma_min": "0.5", "sigmas": [], "errors": []}',
                 '{"sigma_min": 0.5, "sigmas": [1], "errors": ["x"]}'):
        path.write_text(text)
        with pytest.raises(CheckpointError, match="grid-bottom.json is corrupt") as e:
            grid_bottom.run_bottom(tmp_path, "auto")
        assert "\n" not in str(e.value)
    with pytest.raises(CheckpointError):
        grid_bottom.save(tmp_path, {**result, "sigma_min": float("nan")})


def test_config_auto_numbers_and_old_runs():
    import argparse

    assert TrainConfig().sample_sigma_min == "auto"
    p = argparse.ArgumentParser()
    add_config_arguments(p)
    assert "auto: where the EMA denoiser's x0 error falls below" in " ".join(p.format_help().split())
    assert build_config(flags_given(p.parse_args(["--sample-sigma-min", "0.25"]))).validate().sample_sigma_min == 0.25
    assert build_config(flags_given(p.parse_args(["--sample-sigma-min", "auto"]))).validate().sample_sigma_min == "auto"
    with pytest.raises(SystemExit):
        p.parse_args(["--sample-sigma-min", "low"])
    for bad in ("low", 80.0, -1.0):
        with pytest.raises(UsageError, match="sample-sigma-min"):
            TrainConfig(sample_sigma_min=bad).validate()
    saved = TrainConfig(sample_sigma_min=0.5).to_json()
    assert TrainConfig.from_json(json.loads(json.dumps(saved))).sample_sigma_min == 0.5  # a run saved with 0.5 keeps it
    assert TrainConfig.from_json({**saved, "sample_sigma_min": "auto"}).sample_sigma_min == "auto"
    del saved["sample_sigma_min"]
    assert TrainConfig.from_json(saved).sample_sigma_min == 0.0  # from before the setting: the process's own


def test_training_measures_and_sampling_reads_it(tmp_path):
    from difflab.runs.draw import load_run
    from difflab.training.trainer import Trainer

    out = tmp_path / "run"
    cfg = TrainConfig(data="digits", model="tiny", out=str(out), steps=3, batch_size=8, sample_every=0,
                      checkpoint_every=3, sample_steps=2, device="cpu")
    Trainer(cfg, progress=False, log=lambda *a: None).run()
    measured = grid_bottom.load(out)
    assert measured["step"] == 3 and measured["n"] == grid_bottom.HELD and len(measured["errors"]) == len(grid_bottom.SIGMAS)
    assert measured["sigma_min"] == grid_bottom.choose(grid_bottom.SIGMAS, measured["errors"])
    run = load_run(out)
    assert run.sampling_defaults()["sigma_min"] == measured["sigma_min"]
    again = load_run(out).measure_grid_bottom()  # on demand: the same weights, batch and seeds give the same errors
    assert again["errors"] == pytest.approx(measured["errors"], rel=1e-5)
    (out / grid_bottom.FILE).unlink()
    assert load_run(out).sampling_defaults()["sigma_min"] == grid_bottom.FALLBACK
    run = load_run(out)
    flat = torch.zeros(4, *run.shape, dtype=torch.uint8)  # identical images: no variance to measure against
    assert grid_bottom.measure_training(out, run.method, run.net, ImageData(flat, None, None, "flat"), run.conditioner, 3) is None
    with torch.no_grad():
        next(run.net.parameters()).fill_(float("nan"))  # a network that is not finite leaves no measurement
    images = torch.randint(0, 256, (4, *run.shape), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    assert grid_bottom.measure_training(out, run.method, run.net, ImageData(images, None, None, "x"), run.conditioner, 3) is None
    assert grid_bottom.load(out) is None
