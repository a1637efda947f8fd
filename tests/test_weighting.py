"""Training recipes of the Gaussian method: EDM's lognormal noise levels, min-SNR-gamma and EDM loss weightings."""

import math

import pytest
import torch

from difflab.config import TrainConfig
from difflab.denoiser import SIGMA_DATA, Denoiser
from difflab.errors import UsageError
from difflab.methods.noise_levels import P_MEAN, P_STD, lognormal_sigma, training_times
from difflab.methods.weighting import loss_weight, weighted_mse
from difflab.noise import seeded_normal, seeded_uniform
from difflab.processes.continuous import make_process
from difflab.processes.gaussian import make_schedule
from difflab.training.trainer import Trainer

PROCESSES = {"linear": lambda: make_schedule("linear", T=1000), "vp": lambda: make_process({"kind": "vp"}),
             "ve": lambda: make_process({"kind": "ve"})}


def _times(p, n=64):
    u = seeded_uniform(torch.arange(n), 0)
    return training_times(p, u, "uniform").double()


def _edm_lambda(sigma):
    return (sigma**2 + SIGMA_DATA**2) / (sigma * SIGMA_DATA) ** 2


@pytest.mark.parametrize("process", ["linear", "vp"])
def test_min_snr_weights_follow_hang_et_al(process):
    p = PROCESSES[process]()  # variance preserving: gammabar^2 + sigmabar^2 = 1
    t = _times(p)
    sigma = p.sigma_ve(t).double()
    snr = p.snr(t).double()
    capped = snr.clamp(max=5.0)
    for prediction, expected in (("eps", capped / snr), ("v", capped / (snr + 1)), ("x0", capped)):
        w = loss_weight("min-snr", Denoiser(torch.nn.Identity(), p, prediction), sigma, t, 5.0)
        torch.testing.assert_close(w, expected, rtol=1e-9, atol=0)
    w3 = loss_weight("min-snr", Denoiser(torch.nn.Identity(), p, "eps"), sigma, t, 3.0)
    torch.testing.assert_close(w3, snr.clamp(max=3.0) / snr, rtol=1e-9, atol=0)


@pytest.mark.parametrize("process", ["linear", "vp", "ve"])
def test_edm_weighting_is_plain_mse_for_edm_prediction(process):
    """c_out^2 lambda(sigma) = 1: the F-target's plain MSE is already EDM's weighting."""
    p = PROCESSES[process]()
    t = _times(p)
    sigma = p.sigma_ve(t).double()
    den = Denoiser(torch.nn.Identity(), p, "edm")
    torch.testing.assert_close(loss_weight("edm", den, sigma, t), torch.ones_like(sigma), rtol=1e-12, atol=0)
    torch.testing.assert_close(loss_weight("edm", Denoiser(torch.nn.Identity(), p, "x0"), sigma, t), _edm_lambda(sigma))
    torch.testing.assert_close(loss_weight("edm", Denoiser(torch.nn.Identity(), p, "eps"), sigma, t),
                               _edm_lambda(sigma) * sigma**2)
    assert loss_weight("none", den, sigma, t) is None


@pytest.mark.parametrize("process", ["linear", "vp", "ve"])
@pytest.mark.parametrize("weighting", ["min-snr", "edm"])
def test_weighted_output_loss_is_the_x0_loss_for_every_parameterisation(process, weighting):
    """w ||out - target||^2 = lambda(sigma) ||x0_hat(out) - x0||^2, sample by sample, whatever the network predicts."""
    p = PROCESSES[process]()
    n = 16
    t = _times(p, n)
    sigma = p.sigma_ve(t).double()
    torch.manual_seed(0)
    x0 = torch.randn(n, 2, 4, 4, dtype=torch.float64)
    noise = seeded_normal(torch.arange(n), 1, (2, 4, 4)).double()
    y = x0 + sigma.view(-1, 1, 1, 1) * noise
    lam = loss_weight(weighting, Denoiser(torch.nn.Identity(), p, "x0"), sigma, t)
    for prediction in ("eps", "x0", "v", "edm"):
        den = Denoiser(torch.nn.Identity(), p, prediction)
        target = den.target(x0, noise, t).double()
        out = target + 0.3 * torch.randn_like(target)  # an imperfect network output
        x0_hat = den.x0_from_output(y, sigma, t, out)
        w = loss_weight(weighting, den, sigma, t)
        lhs = w * (out - target).square().flatten(1).mean(1)
        rhs = lam * (x0_hat - x0).square().flatten(1).mean(1)
        torch.testing.assert_close(lhs, rhs, rtol=1e-9, atol=0, msg=prediction)
        assert weighted_mse(out, target, w) == pytest.approx(float(rhs.mean()), rel=1e-5)


def test_lognormal_noise_levels_have_edm_statistics():
    u = seeded_uniform(torch.arange(200_000), 7)
    log_sigma = torch.log(lognormal_sigma(u))
    assert float(log_sigma.mean()) == pytest.approx(P_MEAN, abs=0.01)
    assert float(log_sigma.std()) == pytest.approx(P_STD, abs=0.01)
    assert float(log_sigma.median()) == pytest.approx(P_MEAN, abs=0.01)
    # a normal's tails: 15.87% beyond one std on each side
    assert float((log_sigma > P_MEAN + P_STD).float().mean()) == pytest.approx(0.1587, abs=0.003)
    assert bool(torch.isfinite(log_sigma).all())


def test_lognormal_times_map_sigma_through_t_of_and_clamp():
    u = seeded_uniform(torch.arange(20_000), 3)
    sigma = lognormal_sigma(u)
    ve = PROCESSES["ve"]()  # sigma from 0.01 to 50
    t = training_times(ve, u, "lognormal").double()
    inside = (sigma > ve.sigma_min()) & (sigma < ve.sigma_max())
    torch.testing.assert_close(ve.sigma_ve(t)[inside], sigma[inside], rtol=1e-5, atol=0)
    assert float(t.min()) == ve.t_min and float(t.max()) <= ve.t_max
    assert float((~inside).float().mean()) == pytest.approx(float((t == ve.t_min).float().mean()), abs=1e-9)
    lin = PROCESSES["linear"]()
    t = training_times(lin, u, "lognormal").double()
    assert bool((t == t.round()).all()) and 1 <= float(t.min()) and float(t.max()) <= lin.T
    # the step chosen is the one nearest in log sigma (t_of interpolates log sigma between steps)
    steps = torch.arange(1, lin.T + 1, dtype=torch.float64)
    table = torch.log(lin.sigma_ve(steps).double())
    nearest = (torch.log(sigma)[:, None] - table[None, :]).abs().argmin(1) + 1
    assert float((nearest.double() == t).float().mean()) > 0.999  # ties at the half-way points aside


@pytest.mark.parametrize("process,prediction,sampling,weighting", [
    ("linear", "eps", "lognormal", "none"),
    ("linear", "v", "uniform", "min-snr"),
    ("linear", "zprev", "lognormal", "min-snr"),
    ("vp", "x0", "lognormal", "edm"),
    ("ve", "edm", "lognormal", "edm"),
])
def test_training_steps_with_each_option_have_finite_loss(tmp_path, process, prediction, sampling, weighting):
    cfg = TrainConfig(data="digits", out=str(tmp_path / "r"), model="tiny", steps=2, batch_size=8, warmup=1,
                      process=process, prediction=prediction, noise_sampling=sampling, loss_weighting=weighting,
                      sample_every=0, ema_snapshot_every=0)
    tr = Trainer(cfg, progress=False, log=lambda *a: None)
    losses = [float(tr.train_step(s)) for s in range(3)]
    assert all(math.isfinite(v) and v > 0 for v in losses), losses
    assert all(torch.isfinite(p).all() for p in tr.net.parameters())


def test_recipe_options_are_validated():
    with pytest.raises(UsageError, match="--noise-sampling"):
        TrainConfig(noise_sampling="cosine").validate()
    with pytest.raises(UsageError, match="--loss-weighting"):
        TrainConfig(loss_weighting="p2").validate()
    with pytest.raises(UsageError, match="--min-snr-gamma"):
        TrainConfig(min_snr_gamma=0).validate()
    with pytest.raises(UsageError, match="method gaussian"):
        TrainConfig(method="naive2", loss_weighting="min-snr").validate()
