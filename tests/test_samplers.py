"""Samplers against each other and against the exact answer on Gaussian data."""

import pytest
import torch

from difflab.analytic import GaussianDataNet
from difflab.denoiser import Denoiser
from difflab.errors import UsageError
from difflab.noise import SeededNoise, seeded_normal
from difflab.processes.continuous import VE, VPCosine, VPLinear
from difflab.processes.gaussian import cosine_schedule, linear_schedule
from difflab.samplers import SAMPLERS, generate, get_sigmas, karras_sigmas

SHAPE = (1, 4, 4)


def exact(process, mean=0.3, std=0.5):
    return Denoiser(GaussianDataNet(process, mean, std), process, "eps")


def start(den, sigmas, n=64, seed=0):
    noise = SeededNoise(torch.arange(n) + seed)
    x = noise.initial(SHAPE, dtype=torch.float64) * den.process.prior_std()
    return x, noise


def test_ddim_eta1_equals_ddpm_small_variance():
    proc = linear_schedule(T=200)
    den = exact(proc)
    sig = get_sigmas(proc, 200)
    x, noise = start(den, sig)
    a = SAMPLERS["ddim"](den, x, sig, noise=noise, eta=1.0)
    b = SAMPLERS["ddpm"](den, x, sig, noise=noise, variance="small")
    assert torch.allclose(a, b, atol=1e-9)


def test_ddpm_step_matches_posterior_of_the_schedule():
    """One ancestral step in VE units equals mu_tilde / sigma_tilde of part 3 in z units."""
    proc = linear_schedule(T=100)
    den = exact(proc)
    t = torch.tensor([50])
    sig = torch.cat([proc.sigma_ve(t.double()), proc.sigma_ve(t.double() - 1)])
    z = torch.randn(1, *SHAPE, dtype=torch.float64)
    y = z / proc.signal_scale(t).double()
    x0 = den(y, sig[:1])
    zero = lambda i, like: torch.zeros_like(like)  # noqa: E731
    y1 = SAMPLERS["ddpm"](den, y, sig, noise=zero)
    assert torch.allclose(y1 * proc.signal_scale(t - 1).double(), proc.posterior_mean(z, x0, t), atol=1e-9)
    # "large" variance in VE units is beta_t / gammabar_{t-1}^2
    s, s1 = sig[0], sig[1]
    large = (s**2 - s1**2) * (1 + s1**2) / (1 + s**2)
    assert torch.allclose(large, proc.beta(t).double() / proc.signal_scale(t - 1).double() ** 2)


@pytest.mark.parametrize("steps", [10, 37])
def test_ddim_equals_euler_and_dpmpp_order1(steps):
    proc = cosine_schedule(T=1000)
    den = exact(proc)
    sig = get_sigmas(proc, steps, "karras")
    x, _ = start(den, sig)
    a = SAMPLERS["ddim"](den, x, sig, eta=0.0)
    b = SAMPLERS["euler"](den, x, sig)
    c = SAMPLERS["dpmpp-2m"](den, x, sig, order=1)
    assert torch.allclose(a, b, atol=1e-9) and torch.allclose(a, c, atol=1e-9)


@pytest.mark.parametrize("name,steps,opts", [
    ("ddpm", 200, {}), ("ddpm", 200, {"variance": "large"}), ("ddim", 100, {}), ("ddim", 100, {"eta": 0.5}),
    ("euler", 100, {}), ("heun", 50, {}), ("heun", 50, {"churn": 10.0}), ("dpmpp-2m", 50, {}),
    ("dpmpp-3m", 30, {}), ("unipc", 20, {}), ("dpmpp-2m-sde", 50, {}), ("dpmpp-3m-sde", 50, {}),
    ("sde", 400, {}), ("pc", 200, {}), ("langevin", 30, {"steps_per_level": 20, "step_scale": 1e-4}),
])
@pytest.mark.parametrize("proc", [linear_schedule(T=1000), VPLinear(), VE(0.01, 50)], ids=["ddpm", "vp", "ve"])
def test_every_sampler_recovers_gaussian_data(name, steps, opts, proc):
    if name == "ddpm" and opts.get("variance") == "large" and not proc.variance_preserving:
        pytest.skip("large variance is VP-only")
    mean, std = 0.3, 0.5
    den = exact(proc, mean, std)
    x = generate(den, 2000, SHAPE, seed=1, sampler=name, steps=steps, dtype=torch.float64, batch_size=2000, **opts)
    tol_m, tol_s = 0.03, (0.06 if name in ("langevin", "pc", "sde", "ddpm") else 0.03)
    assert abs(float(x.mean()) - mean) < tol_m, (name, float(x.mean()))
    assert abs(float(x.std()) - std) < tol_s, (name, float(x.std()))


def test_samples_independent_of_batch_size_and_seeded():
    den = exact(VPCosine())
    a = generate(den, 12, SHAPE, seed=5, sampler="ddpm", steps=20, batch_size=12)
    b = generate(den, 12, SHAPE, seed=5, sampler="ddpm", steps=20, batch_size=5)
    c = generate(den, 12, SHAPE, seed=6, sampler="ddpm", steps=20, batch_size=12)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    tail = generate(den, 4, SHAPE, seed=5, sampler="ddpm", steps=20, start=8)
    assert torch.equal(tail, a[8:])


def test_seeded_normal_is_standard_normal():
    z = seeded_normal(torch.arange(8), 3, (64, 64))
    assert abs(float(z.mean())) < 0.01 and abs(float(z.std()) - 1) < 0.01
    assert float(((z.flatten() ** 4).mean())) == pytest.approx(3.0, abs=0.1)
    assert not torch.allclose(z[0], z[1])
    assert torch.equal(seeded_normal(torch.tensor([2]), 3, (64, 64)), z[2:3])
    assert not torch.allclose(seeded_normal(torch.arange(8), 4, (64, 64)), z)


def test_karras_grid():
    s = karras_sigmas(10, 0.002, 80.0)
    assert s[0] == pytest.approx(80.0) and s[-2] == pytest.approx(0.002) and s[-1] == 0
    assert bool((s[:-1] > s[1:]).all())


def test_respaced_grid_hits_integer_steps():
    proc = linear_schedule()
    sig = get_sigmas(proc, 10)
    ts = proc.t_of(sig[:-1])
    assert torch.equal(ts, ts.round()) and float(ts[0]) == 1000.0


def test_callback_and_trajectory():
    den = exact(linear_schedule(T=100))
    seen = []
    generate(den, 4, SHAPE, sampler="ddim", steps=10, callback=lambda d: seen.append(d["i"]))
    assert seen == list(range(10))


@pytest.mark.parametrize("name", ["sde", "pc", "dpmpp-2m-sde"])
def test_stochastic_samplers_stay_bounded_with_few_steps(name):
    """The cosine schedule reaches sigma_ve ~ 2e4: Euler-Maruyama in VE units would add noise of that
    size on a coarse grid; stepped in the VP process's own coordinates it stays near the data."""
    den = exact(cosine_schedule(T=1000), 0.3, 0.5)
    x = generate(den, 500, SHAPE, seed=2, sampler=name, steps=10, dtype=torch.float64, batch_size=500)
    assert abs(float(x.mean()) - 0.3) < 0.1 and 0.3 < float(x.std()) < 1.0


def test_sigma_min_raises_the_bottom_of_the_karras_and_geometric_grids():
    proc = cosine_schedule(T=1000)
    for spacing in ("karras", "geometric"):
        plain, raised = get_sigmas(proc, 6, spacing), get_sigmas(proc, 6, spacing, sigma_min=0.5)
        assert float(raised[-2]) == pytest.approx(0.5) and float(raised[0]) == float(plain[0]) == pytest.approx(80.0)
        assert float(plain[-2]) < 0.02 and float(raised[-1]) == 0.0 and len(raised) == len(plain) == 7
        assert (raised[:-1].diff() < 0).all()
        assert torch.equal(get_sigmas(proc, 6, spacing, sigma_min=0.0), plain)  # 0: the process's own bottom
    assert torch.equal(get_sigmas(proc, 6, "uniform", sigma_min=0.5), get_sigmas(proc, 6, "uniform"))
    for bad in (-0.1, 80.0):
        with pytest.raises(UsageError, match="--sigma-min"):
            get_sigmas(proc, 6, "karras", sigma_min=bad)
