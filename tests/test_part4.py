"""Part 4: DDIM inversion and slerp, likelihood by the probability-flow ODE, diffusers models,
the invert / interpolate / likelihood commands, and continuous-time training."""

import importlib.util
import json
import math
import sys

import numpy as np
import pytest
import torch

from difflab.analytic import GaussianDataNet, gaussian_bpd
from difflab.cli import main
from difflab.config import TrainConfig
from difflab.denoiser import Denoiser
from difflab.errors import UsageError
from difflab.figures import to_uint8
from difflab.latents import interpolate, invert, reconstruct, reconstruction_error, slerp
from difflab.likelihood import (
    DEQUANTIZATION_BITS,
    bits_per_dim,
    dequantize,
    divergence,
    log_likelihood,
    noise_range,
)
from difflab.noise import SeededNoise, sample_seeds
from difflab.processes.continuous import VE, VPLinear
from difflab.processes.gaussian import linear_schedule
from difflab.runs.draw import load_run
from difflab.samplers import generate
from difflab.training.trainer import Trainer

MEAN, STD = 0.3, 0.5
SHAPE = (1, 4, 4)
PROCESSES = [linear_schedule(T=1000), VE(0.01, 50)]
IDS = ["ddpm-linear", "ve"]


def exact(process, mean=MEAN, std=STD):
    return Denoiser(GaussianDataNet(process, mean, std), process, "eps")


def gaussian_data(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return MEAN + STD * torch.randn(n, *SHAPE, generator=g, dtype=torch.float64)


# --- inversion, reconstruction, slerp --------------------------------------------------------------
@pytest.mark.parametrize("proc", PROCESSES, ids=IDS)
def test_inversion_converges_to_the_ode_latent(proc):
    """On Gaussian data the probability-flow ODE is known: y(sigma) - m grows as sqrt(s0^2 + sigma^2)."""
    den, x = exact(proc), gaussian_data()
    true = (MEAN + (x - MEAN) * math.sqrt(STD**2 + proc.sigma_max() ** 2) / STD) / proc.prior_std()
    errors = {}
    for steps in (100, 1000):
        z = invert(den, x, steps)
        errors[steps] = float((reconstruct(den, z, steps) - x).abs().max()), float((z - true).abs().max())
    rec, lat = errors[1000]
    assert rec < 0.02 and lat < 0.02, errors
    # first order: 10x the steps, about 10x smaller errors
    assert rec < errors[100][0] / 4 and lat < errors[100][1] / 4, errors
    assert abs(float(invert(den, x, 1000).std()) - 1) < 0.15  # standard-normal units


@pytest.mark.parametrize("proc", PROCESSES, ids=IDS)
def test_refined_inversion_round_trip_is_exact_and_feeds_generate(proc):
    den, x = exact(proc), gaussian_data()
    z = invert(den, x, 10, refine=60)
    assert torch.allclose(reconstruct(den, z, 10), x, atol=1e-6)
    # the latent is what generate / `difflab sample --init-noise` takes
    y = generate(den, len(x), SHAPE, sampler="ddim", steps=10, init_noise=z, dtype=torch.float64)
    assert torch.allclose(y, x.float(), atol=1e-5)  # generate returns float32


def test_slerp_endpoints_and_norms():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(6, 512, generator=g), torch.randn(6, 512, generator=g)
    b = b * (a.norm(dim=1, keepdim=True) / b.norm(dim=1, keepdim=True))  # equal norms per row
    assert torch.equal(slerp(a, b, 0.0), a) and torch.equal(slerp(a, b, 1.0), b)
    t = torch.tensor([0.0, 1.0, 0.25, 0.5, 0.75, 1.0])
    out = slerp(a, b, t)
    assert torch.equal(out[0], a[0]) and torch.equal(out[1], b[1]) and torch.equal(out[5], b[5])
    assert torch.allclose(out.norm(dim=1), a.norm(dim=1), rtol=1e-5)  # stays on the sphere
    lerp = 0.5 * (a + b)
    assert bool((lerp.norm(dim=1) < 0.8 * a.norm(dim=1)).all())  # what slerp avoids
    e0, e1 = torch.eye(2)[None, 0], torch.eye(2)[None, 1]
    assert torch.allclose(slerp(e0, e1, 0.5), (e0 + e1) / math.sqrt(2))
    # rows of different norms: the weights act on the raw vectors
    want = torch.tensor([[math.sin(math.pi / 3), 3 * math.sin(math.pi / 6)]])
    assert torch.allclose(slerp(e0, 3 * e1, 1 / 3), want)
    near = slerp(a[:1], a[:1] * (1 + 1e-9), 0.3)  # parallel: falls back to lerp, no NaN
    assert torch.isfinite(near).all() and torch.allclose(near, a[:1])
    anti = slerp(a[:1], -a[:1], 0.25)
    assert torch.isfinite(anti).all() and torch.allclose(anti, 0.5 * a[:1], atol=1e-5)


def test_interpolate_ends_are_the_seeds_samples():
    den = exact(linear_schedule(T=1000))
    za, zb = (SeededNoise(sample_seeds(s, 1)).initial(SHAPE) for s in (1, 2))
    x = interpolate(den, za, zb, 5, 20)
    assert x.shape == (5, *SHAPE)
    assert torch.allclose(x[0], generate(den, 1, SHAPE, seed=1, sampler="ddim", steps=20)[0], atol=1e-5)
    assert torch.allclose(x[-1], generate(den, 1, SHAPE, seed=2, sampler="ddim", steps=20)[0], atol=1e-5)
    assert not torch.allclose(x[2], x[0])


def test_reconstruction_error_units():
    a = torch.zeros(2, 1, 4, 4, dtype=torch.uint8)
    b = a.clone()
    assert reconstruction_error(a, b) == (0.0, math.inf)
    b[0, 0, 0, 0] = 32  # one pixel of 32 levels among 32 pixels: MSE 32
    mse, psnr = reconstruction_error(a, b)
    assert mse == 32.0 and psnr == pytest.approx(10 * math.log10(255**2 / 32))


# --- likelihood ------------------------------------------------------------------------------------
@pytest.mark.parametrize("proc", PROCESSES + [VPLinear()], ids=IDS + ["vp"])
def test_bpd_of_gaussian_data_matches_the_exact_density(proc):
    """The ODE starts at sigma_min, where the data is smoothed by N(0, sigma_min^2): compare with the
    exact density of N(mean, std^2 + sigma_min^2)."""
    x = gaussian_data(64, seed=3)
    logp = log_likelihood(exact(proc), x, steps=32, exact=True)
    bpd = float((-logp / (x[0].numel() * math.log(2))).mean())
    ref = gaussian_bpd(MEAN, math.sqrt(STD**2 + noise_range(proc)[0] ** 2), x)
    assert bpd == pytest.approx(ref, rel=0.005)
    # the Jacobian of the exact model is a multiple of I: Rademacher probes are then exact too
    hutch = log_likelihood(exact(proc), x, steps=32, hutchinson_samples=1)
    assert torch.allclose(hutch, logp, rtol=1e-9)


def test_hutchinson_approaches_exact_divergence():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(1, 1, 3, padding=1).double()

    def fn(y):
        return torch.tanh(conv(y)) + y**2

    y = torch.randn(3, *SHAPE, dtype=torch.float64)
    _, div = divergence(fn, y, None)
    jac = [torch.autograd.functional.jacobian(lambda v: fn(v[None])[0].flatten(), y[i]).reshape(16, 16)
           for i in range(3)]
    assert torch.allclose(div, torch.stack([j.trace() for j in jac]), atol=1e-10)
    for kind in ("gaussian", "rademacher"):
        probes = torch.randn(4000, *y.shape, dtype=torch.float64)
        if kind == "rademacher":
            probes = probes.sign()
        _, est = divergence(fn, y, list(probes))
        sd = torch.stack([j.norm() for j in jac]) * math.sqrt(2 / len(probes))
        assert bool(((est - div).abs() < 4 * sd).all()), (kind, est, div, sd)


def test_bpd_of_8bit_data_includes_the_dequantisation_jacobian():
    """k = floor(c), c ~ N(mu, s^2) in pixel units: the model of the dequantised data is exactly Gaussian
    in model units, so bits/dim = exact density of the dequantised x + log2(128), and it bounds the
    true discrete entropy closely (a log2(127.5) or missing correction would be off)."""
    mu, s, n = 120.0, 20.0, 128
    g = torch.Generator().manual_seed(0)
    k = (mu + s * torch.randn(n, *SHAPE, generator=g, dtype=torch.float64)).floor().clamp(0, 255)
    proc = VE(0.01, 50)
    den = exact(proc, mu / 128 - 1, s / 128)
    bpd = bits_per_dim(den, k.to(torch.uint8), steps=32, exact=True, dtype=torch.float64, batch_size=n)
    x = dequantize(k.to(torch.uint8), sample_seeds(0, n))
    assert bool((x >= -1).all() and (x < 1).all())
    analytic = gaussian_bpd(mu / 128 - 1, math.sqrt((s / 128) ** 2 + noise_range(proc)[0] ** 2), x)
    assert float(bpd.mean()) == pytest.approx(analytic + DEQUANTIZATION_BITS, abs=1e-3)
    normal = torch.distributions.Normal(mu, s)
    true = float(-torch.log2(normal.cdf(k + 1) - normal.cdf(k)).mean())
    assert abs(float(bpd.mean()) - true) < 2e-3
    # per-image seeds: the same values whatever the batch size (Gaussian probes do depend on them)
    a = bits_per_dim(den, k[:10].to(torch.uint8), steps=4, probe="gaussian", batch_size=10)
    b = bits_per_dim(den, k[:10].to(torch.uint8), steps=4, probe="gaussian", batch_size=3)
    assert torch.allclose(a, b, atol=1e-5)
    with pytest.raises(UsageError, match="uint8"):
        bits_per_dim(den, k.float())


# --- diffusers -------------------------------------------------------------------------------------
def _tiny_diffusers(folder, prediction_type, beta_schedule):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                                 block_out_channels=(8, 16), norm_num_groups=4,
                                 down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"))
    unet.save_pretrained(folder)
    # trailing spacing and alphabar = 1 at the end make diffusers' grid difflab's uniform one
    sched = diffusers.DDIMScheduler(prediction_type=prediction_type, beta_schedule=beta_schedule,
                                    timestep_spacing="trailing", set_alpha_to_one=True, clip_sample=False)
    sched.save_pretrained(folder)
    return unet, sched


def _diffusers_ddim(unet, sched, noise, steps):
    sched.set_timesteps(steps)
    x = noise.clone()
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(unet(x, t).sample, t, x, eta=0.0).prev_sample
    return x


@pytest.mark.parametrize("prediction_type,beta_schedule,steps", [
    ("epsilon", "linear", 20), ("v_prediction", "squaredcos_cap_v2", 10)])
def test_diffusers_unet_matches_diffusers_ddim(tmp_path, prediction_type, beta_schedule, steps):
    unet, sched = _tiny_diffusers(tmp_path, prediction_type, beta_schedule)
    from difflab.interop import load_diffusers_unet

    den, shape = load_diffusers_unet(tmp_path)
    assert shape == (1, 8, 8)
    t = torch.arange(1, 1001)
    assert torch.allclose(den.process.gammabar(t) ** 2, sched.alphas_cumprod.double(), rtol=1e-12, atol=0)
    noise = torch.randn(3, *shape, generator=torch.Generator().manual_seed(5))
    ref = _diffusers_ddim(unet, sched, noise, steps)
    ours = generate(den, 3, shape, sampler="ddim", steps=steps, init_noise=noise)
    scale = float(ref.abs().max())
    assert torch.allclose(ours, ref, rtol=1e-4, atol=1e-5 * max(scale, 1.0)), float((ours - ref).abs().max())


def test_diffusers_cli_round_trip(tmp_path, capsys):
    unet, sched = _tiny_diffusers(tmp_path / "model", "v_prediction", "squaredcos_cap_v2")
    noise = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(7))
    np.save(tmp_path / "noise.npy", noise.numpy())
    code, _, err = _cli(capsys, "sample", "--diffusers-model", tmp_path / "model", "--init-noise",
                        tmp_path / "noise.npy", "--n", 4, "--sampler", "ddim", "--steps", 10,
                        "--save-npz", tmp_path / "s.npz")
    assert code == 0, err
    got = torch.from_numpy(np.load(tmp_path / "s.npz")["images"]).permute(0, 3, 1, 2).int()
    want = to_uint8(_diffusers_ddim(unet, sched, noise, 10)).int()
    assert (got - want).abs().max() <= 1 and float((got == want).float().mean()) > 0.95


def test_diffusers_missing_or_bad_folder(tmp_path, monkeypatch):
    from difflab.errors import CheckpointError
    from difflab.interop import load_diffusers_unet

    if importlib.util.find_spec("diffusers") is not None:
        with pytest.raises(CheckpointError, match="save_pretrained"):
            load_diffusers_unet(tmp_path)
    monkeypatch.setitem(sys.modules, "diffusers", None)  # as if not installed
    with pytest.raises(UsageError, match="pip install diffusers"):
        load_diffusers_unet(tmp_path)


# --- the commands on a tiny trained run ------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("part4") / "run"
    cfg = TrainConfig(data="digits", out=str(out), model="tiny", steps=10, batch_size=16, log_every=5,
                      checkpoint_every=10, sample_every=0, sample_steps=2, warmup=2, lr=1e-3)
    Trainer(cfg, progress=False, log=lambda *a: None).run()
    return out


def _cli(capsys, *args):
    try:
        code = main([str(a) for a in args])
    except SystemExit as e:  # argparse errors
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_invert_writes_strip_latents_and_error(tiny_run, tmp_path, capsys):
    code, out, err = _cli(capsys, "invert", "--run", tiny_run, "--data", "digits", "--n", 4, "--steps", 20,
                          "--out", tmp_path / "strip.png", "--save-latents", tmp_path / "z.npy")
    assert code == 0, err
    assert (tmp_path / "strip.png").stat().st_size > 0
    assert "MSE" in out and "PSNR" in out
    z = torch.from_numpy(np.load(tmp_path / "z.npy"))
    assert z.shape == (4, 1, 8, 8) and z.dtype == torch.float32
    # the latents decode through the run's sampler exactly as through reconstruct()
    run = load_run(tiny_run)
    via_sample = run.sample(4, sampler="ddim", steps=20, init_noise=z)
    assert torch.equal(via_sample, to_uint8(reconstruct(run.denoiser(), z, 20)))


def test_cli_interpolate_seeds_and_images(tiny_run, tmp_path, capsys):
    code, _, err = _cli(capsys, "interpolate", "--run", tiny_run, "--seeds", 1, 2, "--n", 5, "--steps", 5,
                          "--out", tmp_path / "seeds.png")
    assert code == 0, err
    assert (tmp_path / "seeds.png").exists()
    from PIL import Image

    from difflab.data import load

    for i, img in enumerate(load("digits", split="test").images[:2]):
        Image.fromarray(img[0].numpy()).save(tmp_path / f"{i}.png")
    code, _, err = _cli(capsys, "interpolate", "--run", tiny_run, "--images", tmp_path / "0.png",
                          tmp_path / "1.png", "--n", 4, "--steps", 5, "--out", tmp_path / "images.png")
    assert code == 0, err
    assert Image.open(tmp_path / "images.png").size[0] > Image.open(tmp_path / "images.png").size[1]


def test_cli_likelihood_prints_and_writes_json(tiny_run, tmp_path, capsys):
    code, out, err = _cli(capsys, "likelihood", "--run", tiny_run, "--data", "digits", "--split", "test",
                          "--n", 6, "--steps", 2, "--batch-size", 4, "--json", tmp_path / "ll" / "bpd.json")
    assert code == 0, err
    assert "bits/dim" in out
    result = json.loads((tmp_path / "ll" / "bpd.json").read_text())
    assert result["n"] == 6 and len(result["per_image"]) == 6
    assert DEQUANTIZATION_BITS < result["bits_per_dim"] < 64


@pytest.mark.parametrize("args,msg", [
    (["invert", "--n", "0"], "--n"),
    (["likelihood", "--hutchinson-samples", "0"], "--hutchinson-samples"),
    (["interpolate", "--seeds", "1"], "--seeds"),
    (["interpolate", "--seeds", "1", "2", "--images", "a.png", "b.png"], "not allowed"),
    (["interpolate", "--images", "nope.png", "nope2.png"], "nope.png"),
    (["invert", "--data", "no-such-dataset"], "no-such-dataset"),
])
def test_cli_usage_errors_are_one_line_exit_2(tiny_run, capsys, args, msg):
    code, _, err = _cli(capsys, args[0], "--run", tiny_run, *args[1:])
    assert code == 2, err
    assert msg in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err


# --- continuous time -------------------------------------------------------------------------------
def test_continuous_vp_training_samples_with_ode_and_sde(tmp_path):
    cfg = TrainConfig(data="digits", out=str(tmp_path / "vp"), process="vp", model="tiny", steps=10,
                      batch_size=16, log_every=5, checkpoint_every=10, sample_every=0, sample_steps=2,
                      warmup=2)
    Trainer(cfg, progress=False, log=lambda *a: None).run()
    run = load_run(tmp_path / "vp")
    assert isinstance(run.method.process, VPLinear)
    den = run.denoiser()
    for sampler in ("ddim", "heun", "sde"):
        x = generate(den, 3, run.shape, seed=2, sampler=sampler, steps=4)
        assert x.shape == (3, 1, 8, 8) and torch.isfinite(x).all(), sampler
        # generate() does not clip and ends the grid at the process's own bottom
        images = run.sample(3, seed=2, sampler=sampler, steps=4, clip="none", sigma_min=0.0)
        assert images.dtype == torch.uint8 and torch.equal(images, to_uint8(x))
