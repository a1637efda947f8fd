"""Part 1 end to end: naive1, naive2 and cold runs trained, sampled and drawn from the command line."""

import io
import json
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import difflab
from difflab.cli import build_parser, main
from difflab.cli.figures import noising_chain
from difflab.cli.train import given_settings
from difflab.config import TrainConfig
from difflab.figures import save_grid
from difflab.recipe import METHOD_DEFAULTS, build_config
from difflab.runs.checkpoint import latest_checkpoint
from difflab.runs.draw import load_run

# a few steps on the 8x8 digits; k * T fits 8x8 (naive1: 4 steps of 8 of the 64 pixels)
COMMON = ["--data", "digits", "--steps", "6", "--batch-size", "8", "--log-every", "3", "--checkpoint-every", "6",
          "--sample-every", "0", "--sample-steps", "4", "--warmup", "2", "--lr", "1e-3", "--quiet"]
RUNS = {
    "naive1": ["--method", "naive1", "--T", "4", "--k", "8"],
    "naive2": ["--method", "naive2"],
    # enough steps that the network's output depends on the colour it is given
    "cold": ["--method", "cold", "--degradation", "fade-colour", "--steps", "30", "--checkpoint-every", "30"],
    "fade-black": ["--method", "cold", "--degradation", "fade-black", "--steps", "30", "--checkpoint-every", "30"],
}
SCALE = 8  # figures draw 8x8 images 8 times larger (about 64 pixels each)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest


def cli(*argv: str) -> tuple[int, str, str]:
    """Run ``difflab ARGV`` in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, tuple[Path, str]]:
    """Every part 1 method trained for 6 steps from the CLI: name -> (run folder, stdout)."""
    root = tmp_path_factory.mktemp("part1")
    trained = {}
    for name, flags in RUNS.items():
        code, out, err = cli("train", *COMMON, *flags, "--out", str(root / name))
        assert code == 0, err
        trained[name] = (root / name, out)
    return trained


def png_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as img:
        return img.size


def strip_size(rows: int, columns: int, side: int = 8, pad: int = 2) -> tuple[int, int]:
    """(width, height) of a save_rows / save_grid PNG of rows x columns images."""
    return ((columns * (side + pad) + pad) * SCALE, (rows * (side + pad) + pad) * SCALE)


@pytest.mark.parametrize("name, channels", [("naive1", [8, 16, 24]), ("naive2", [16, 32, 64]), ("cold", [16, 32, 64])])
def test_training_writes_a_run_with_the_series_network(runs, name, channels):
    folder, _ = runs[name]
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["method"] == RUNS[name][1]
    _, meta = latest_checkpoint(folder / "checkpoints")
    steps = 30 if name == "cold" else 6
    assert meta["step"] == steps and meta["image_shape"] == [1, 8, 8]
    assert meta["network"]["kind"] == "coordconv_unet" and meta["network"]["channels"] == channels
    losses = [float(r.split(",")[1]) for r in (folder / "loss.csv").read_text().splitlines()[1:]]
    assert len(losses) == steps // 3 and all(np.isfinite(losses)) and all(v > 0 for v in losses)


def test_naive1_log_reports_the_untouched_fraction(runs):
    _, log = runs["naive1"]
    expected = 100 * (1 - 8 / 64) ** 4  # a pixel escapes each of the 4 steps with probability 1 - k/hw
    assert f"binomial noise k=8, T=4 on 8x8: {expected:.1f}% of pixels never touched" in log


@pytest.mark.parametrize("name", ["naive1", "naive2", "cold"])
def test_sample_cli_writes_a_grid_and_npz(runs, tmp_path, name):
    folder, _ = runs[name]
    code, _, err = cli("sample", "--run", str(folder), "--n", "6", "--seed", "3", "--steps", "4",
                         "--out", str(tmp_path / "grid.png"), "--save-npz", str(tmp_path / "s.npz"))
    assert code == 0, err
    images = np.load(tmp_path / "s.npz")["images"]
    assert images.shape == (6, 8, 8, 1) and images.dtype == np.uint8
    assert png_size(tmp_path / "grid.png") == (2 * (3 * 10 + 2), 2 * (2 * 10 + 2))  # 2 rows of 3, scale 2
    again = load_run(folder).sample(6, seed=3, steps=4)  # the Python API gives the same samples
    assert np.array_equal(again.permute(0, 2, 3, 1).numpy(), images)


def test_fade_to_black_collapses_to_one_sample_fade_to_colour_does_not(runs):
    black = load_run(runs["fade-black"][0])
    a, b = black.sample(8, seed=0, steps=5), black.sample(8, seed=1, steps=5)
    assert (a == a[:1]).all() and torch.equal(a, b)  # every seed: the same image
    colour = load_run(runs["cold"][0]).sample(8, seed=0, steps=5)
    assert len({tuple(img.flatten().tolist()) for img in colour}) >= 6  # (nearly) every seed its own sample
    spread = colour.float().amax(0) - colour.float().amin(0)
    assert float(spread.max()) >= 8  # that differ by more than rounding (after only 30 training steps)


@pytest.mark.parametrize("name, files, trajectory_rows", [
    ("naive1", ["noising.png", "samples.png", "trajectory.png"], 1),
    ("naive2", ["noising.png", "prediction-from-noise.png", "mean-image.png", "samples.png", "trajectory.png",
                "trajectory-cold-update.png"], 2),
    ("cold", ["noising.png", "prediction-from-noise.png", "mean-image.png", "samples.png", "trajectory.png"], 2),
])
def test_figures_cli_writes_the_series_figures(runs, tmp_path, name, files, trajectory_rows):
    folder, _ = runs[name]
    code, out, err = cli("figures", "--run", str(folder), "--out", str(tmp_path), "--n", "3", "--grid", "4",
                         "--columns", "5", "--steps", "4")
    assert code == 0, err
    assert out.split() == [str(tmp_path / f) for f in files]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(files)
    assert png_size(tmp_path / "noising.png") == strip_size(3, 5)
    assert png_size(tmp_path / "samples.png") == strip_size(1, 4)
    # samples.png: what difflab.load(RUN).sample draws (the one drawing path), tiled
    want = save_grid(difflab.load(folder).sample(4, seed=0, steps=4), tmp_path / "want.png", nrow=4, scale=SCALE)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "samples.png")), np.asarray(Image.open(want)))
    steps = 5 if name == "naive1" else 4  # naive1 draws z_T .. z_0 (T = 4); the others one column a step
    assert png_size(tmp_path / "trajectory.png") == strip_size(3 * trajectory_rows, steps)
    if "mean-image.png" in files:
        assert png_size(tmp_path / "prediction-from-noise.png") == strip_size(2, 3)
        assert png_size(tmp_path / "mean-image.png") == strip_size(1, 2)


@pytest.mark.parametrize("name", ["naive1", "naive2", "cold"])
def test_noising_strip_starts_at_the_image_and_ends_fully_noised(runs, name):
    run = load_run(runs[name][0])
    x = torch.linspace(-0.8, 0.8, 64).reshape(1, 1, 8, 8).repeat(2, 1, 1, 1)  # no pixel is +-1 or constant
    chain = noising_chain(run, x, 5, torch.Generator().manual_seed(0))
    assert chain.shape == (5, 2, 1, 8, 8) and torch.equal(chain[0], x)
    last = chain[-1]
    if name == "naive2":  # every pixel black or white
        assert bool((last.abs() == 1).all())
    elif name == "cold":  # one flat colour per image
        assert bool((last == last[:, :, :1, :1]).all())
    else:  # naive1 with replacement: (1 - 8/64)^4 of the pixels on average untouched, the rest random bits
        assert 0 < float((last == x).float().mean()) < 1 and bool(((last == x) | (last.abs() == 1)).all())


def test_bad_degradation_is_one_line_and_exit_2(tmp_path):
    code, _, err = cli("train", "--method", "cold", "--degradation", "nope", *COMMON, "--out", str(tmp_path / "r"))
    assert code == 2
    assert err.count("\n") == 1 and "unknown degradation 'nope'" in err and "fade-colour" in err
    assert not (tmp_path / "r").exists()


def test_too_many_naive2_steps_is_one_line_and_exit_2(runs, tmp_path):
    code, _, err = cli("sample", "--run", str(runs["naive2"][0]), "--n", "2", "--steps", "65",
                       "--out", str(tmp_path / "g.png"))
    assert code == 2 and "error: naive2 samples in 1 to T = h*w = 64 steps on 8x8 images, got --steps 65\n" in err
    assert not (tmp_path / "g.png").exists()


def test_too_many_noised_pixels_for_8x8_is_one_line_and_exit_2(tmp_path):
    code, _, err = cli("train", "--method", "naive1", "--k", "100", "--T", "2", *COMMON, "--out", str(tmp_path / "r"))
    assert code == 2 and "k=100 pixels per step, but 8x8 has only 64" in err and err.count("\n") == 1


def parsed(*argv: str) -> TrainConfig:
    return build_config(given_settings(build_parser("train").parse_args(["train", *argv])))


def test_method_defaults_fill_only_the_flags_not_given():
    cfg = parsed("--method", "naive1", "--lr", "1e-3")
    assert (cfg.T, cfg.k, cfg.batch_size, cfg.warmup, cfg.grad_clip, cfg.lr) == (60, 32, 16, 63, 1.0, 1e-3)
    assert parsed("--method", "naive1", "--T", "8").T == 8
    n2 = parsed("--method", "naive2")
    assert (n2.lr, n2.batch_size, n2.sample_steps, n2.cold_update, n2.told_noise) == (1e-3, 64, 64, True, 0.6)
    series = parsed("--method", "naive2", "--no-cold-update", "--told-noise", "1")
    assert (series.cold_update, series.told_noise) == (False, 1.0)
    cold = parsed("--method", "cold")
    assert (cold.lr, cold.batch_size, cold.degradation) == (3e-4, 16, "fade-colour")
    gaussian = parsed("--process", "cosine")
    # Gaussian runs keep the dataclass defaults (the measured recipe; lr 0 is resolved by network size)
    assert (gaussian.T, gaussian.lr, gaussian.batch_size) == (1000, 0.0, 64) and METHOD_DEFAULTS["gaussian"] == {}
    python = TrainConfig(method="naive1")  # made in Python: every field is what it says
    assert python.T == 1000
    assert build_config({"method": "naive1"}).T == 60


def test_train_flags_get_the_method_defaults():
    cfg = parsed("--method", "naive1", "--k", "2")  # what 'difflab train' builds from its flags
    assert (cfg.T, cfg.k, cfg.batch_size, cfg.lr, cfg.warmup) == (60, 2, 16, 3e-4, 63)
    assert parsed("--method", "gaussian").T == 1000


def test_figures_usage_errors_are_one_line_and_exit_2(runs, tmp_path):
    code, _, err = cli("figures", "--run", str(runs["naive2"][0]), "--columns", "1", "--out", str(tmp_path / "f"))
    assert code == 2 and err.count("\n") == 1 and "--columns at least 2" in err
    assert not (tmp_path / "f").exists()
    code, _, err = cli("figures", "--run", str(tmp_path / "missing"))
    assert code == 2 and err.count("\n") == 1 and "does not exist" in err


def test_figures_never_replace_files_in_a_users_folder_without_force(runs, tmp_path):
    folder, _ = runs["naive1"]
    (tmp_path / "samples.png").write_bytes(b"someone else's picture")
    (tmp_path / "notes.txt").write_text("keep")
    args = ("figures", "--run", str(folder), "--out", str(tmp_path), "--n", "2", "--grid", "4", "--columns", "3",
            "--steps", "4")
    code, _, err = cli(*args)
    assert code == 2 and err.count("\n") == 1 and "samples.png" in err and "--force" in err
    assert (tmp_path / "samples.png").read_bytes() == b"someone else's picture"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "samples.png"]
    code, _, err = cli(*args, "--force")
    assert code == 0, err
    assert (tmp_path / "samples.png").read_bytes().startswith(b"\x89PNG") and (tmp_path / "notes.txt").read_text() == "keep"


def test_naive2_runs_sample_with_their_update_and_told_noise(runs, tmp_path):
    run = load_run(runs["naive2"][0])
    d = run.sampling_defaults()
    assert (d["cold_update"], d["told_noise"]) == (True, 0.6)  # the naive2 recipe's
    default = run.sample(4, steps=4)
    assert torch.equal(default, run.sample(4, steps=4, cold_update=True, told_noise=0.6))
    assert not torch.equal(default, run.sample(4, steps=4, cold_update=False, told_noise=1.0))
    code, _, err = cli("sample", "--run", str(runs["naive2"][0]), "--n", "2", "--told-noise", "0",
                       "--out", str(tmp_path / "x.png"))
    assert code == 2 and "--told-noise" in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "x.png").exists()
    code, _, err = cli("sample", "--run", str(runs["naive2"][0]), "--n", "2", "--steps", "4", "--no-cold-update",
                       "--told-noise", "1", "--out", str(tmp_path / "y.png"))
    assert code == 0, err
