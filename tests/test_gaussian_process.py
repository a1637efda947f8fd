"""Part 2 identities and part 3 / 4 processes, checked against simulation."""

import math

import pytest
import torch

from difflab import gaussians
from difflab.processes.continuous import VE, VPCosine, VPLinear, make_process, sde_coefficients
from difflab.processes.gaussian import (
    constant_schedule,
    cosine_schedule,
    linear_schedule,
    make_schedule,
    sigmoid_schedule,
)

G = lambda s=0: torch.Generator().manual_seed(s)  # noqa: E731


def test_affine_gaussian_by_simulation():
    A = torch.tensor([[2.0, 0.0], [1.0, 0.5]], dtype=torch.float64)
    t = torch.tensor([1.0, -3.0], dtype=torch.float64)
    x = gaussians.affine_sample(A, t, 200_000, G())
    mean, cov = gaussians.affine_moments(A, t)
    assert torch.allclose(x.mean(0), mean, atol=0.02)
    assert torch.allclose(torch.cov(x.T), cov, atol=0.03)
    M, b = torch.tensor([[1.0, 1.0]], dtype=torch.float64), torch.tensor([0.5], dtype=torch.float64)
    m2, c2 = gaussians.transform(mean, cov, M, b)
    y = x @ M.T + b
    assert abs(float(y.mean()) - float(m2)) < 0.02 and abs(float(y.var()) - float(c2)) < 0.05


def test_std_add_and_chain_by_simulation():
    g = G(1)
    a = 3 + 0.7 * torch.randn(300_000, generator=g, dtype=torch.float64)
    b = a + 1.3 * torch.randn(300_000, generator=g, dtype=torch.float64)
    assert abs(float(b.std()) - float(gaussians.add_std(0.7, 1.3))) < 0.01
    mu, var = gaussians.chain(torch.tensor(3.0), torch.tensor(0.49), torch.tensor(1.69))
    assert abs(float(b.mean()) - 3) < 0.01 and abs(float(b.var()) - float(var)) < 0.02


def test_kl_same_variance_is_scaled_squared_error():
    mu, nu = torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[0.0, 2.5, 3.0]])
    full = gaussians.kl_spherical(mu, 0.5, nu, 0.5)
    assert torch.allclose(full, gaussians.kl_same_variance(mu, nu, 0.5))
    # against a Monte-Carlo estimate of E_p[log p - log q]
    x = mu + 0.5 * torch.randn(200_000, 3, generator=G(2))
    mc = (gaussians.log_density(x, mu, 0.5) - gaussians.log_density(x, nu, 0.7)).mean()
    assert abs(float(mc) - float(gaussians.kl_spherical(mu, 0.5, nu, 0.7))) < 0.02


@pytest.mark.parametrize("sched", [linear_schedule(), cosine_schedule(), sigmoid_schedule(), constant_schedule(0.9, 120)])
def test_marginal_matches_step_by_step_simulation(sched):
    """z_t drawn by t chained steps has mean gammabar_t x and std sigmabar_t."""
    x = torch.full((20_000,), 0.8, dtype=torch.float64)
    g, z = G(3), x.clone()
    checkpoints = {1, sched.T // 2, sched.T}
    for t in range(1, sched.T + 1):
        z = sched.step(z, torch.tensor(t), torch.randn(z.shape, generator=g, dtype=torch.float64))
        if t in checkpoints:
            tt = torch.tensor(t)
            assert abs(float(z.mean()) - 0.8 * float(sched.gammabar(tt))) < 0.03
            assert abs(float(z.std()) - float(sched.sigmabar(tt))) < 0.02


def test_gammabar_includes_gamma_t_no_off_by_one():
    s = constant_schedule(0.9, 120)
    assert math.isclose(float(s.gammabar(torch.tensor(1))), 0.9)
    assert math.isclose(float(s.gammabar(torch.tensor(3))), 0.9**3)
    assert float(s.gammabar(torch.tensor(0))) == 1.0


def test_schedule_endpoints():
    """gammabar_T: 0.9 over 120 steps converges, 0.99 does not (the series' remark)."""
    assert float(constant_schedule(0.9, 120).gammabar(torch.tensor(120))) < 1e-5
    assert 0.25 < float(constant_schedule(0.99, 120).gammabar(torch.tensor(120))) < 0.35
    lin = linear_schedule()
    assert math.isclose(float(lin.beta(torch.tensor(1))), 1e-4, rel_tol=1e-9)
    assert math.isclose(float(lin.beta(torch.tensor(1000))), 0.02, rel_tol=1e-9)
    assert float(lin.gammabar(torch.tensor(1000))) < 0.01  # 0.0064
    assert float(cosine_schedule().gammabar(torch.tensor(1000))) < 1e-3
    assert "gammabar_T" in lin.describe()


def test_posterior_mean_forms_agree_and_match_simulation():
    s = linear_schedule(T=100)
    t = torch.tensor([2, 37, 100])
    x = torch.randn(3, 5, generator=G(4), dtype=torch.float64)
    eps = torch.randn(3, 5, generator=G(5), dtype=torch.float64)
    z = s.marginal(x, t, eps)
    assert torch.allclose(s.posterior_mean(z, x, t), s.posterior_mean_from_noise(z, eps, t), atol=1e-10)
    # simulate q(z_{t-1} | z_t, x): draw pairs, keep those with z_t near a target value (1-D regression)
    tt, n = 10, 400_000
    g = G(6)
    x0 = torch.full((n,), 0.5, dtype=torch.float64)
    zp = s.marginal(x0, torch.tensor(tt - 1), torch.randn(n, generator=g, dtype=torch.float64))
    zt = s.step(zp, torch.tensor(tt), torch.randn(n, generator=g, dtype=torch.float64))
    # linear regression of z_{t-1} on z_t recovers the posterior mean's slope, residual its variance
    cz = s.gamma(torch.tensor(tt)) * (1 - s.gammabar(torch.tensor(tt - 1)) ** 2) / s.sigmabar(torch.tensor(tt)) ** 2
    slope = torch.cov(torch.stack([zt, zp]))[0, 1] / zt.var()
    assert abs(float(slope) - float(cz)) < 0.01
    resid = zp - slope * zt
    assert abs(float(resid.var()) / float(s.posterior_variance(torch.tensor(tt))) - 1) < 0.02


def test_posterior_variance_formula():
    s = cosine_schedule(T=50)
    t = torch.arange(2, 51)
    expected = (1 - s.gammabar(t - 1) ** 2) / (1 - s.gammabar(t) ** 2) * (1 - s.gamma(t) ** 2)
    assert torch.allclose(s.posterior_variance(t), expected)
    assert bool((s.posterior_variance(t) <= s.beta(t) + 1e-12).all())


@pytest.mark.parametrize("proc", [linear_schedule(), cosine_schedule(T=200), VPLinear(), VPCosine(), VE()])
def test_sigma_ve_inverse_and_snr(proc):
    ts = torch.linspace(proc.t_max, max(proc.t_min, 1.0 if proc.discrete else 0.01), 37, dtype=torch.float64)
    sig = proc.sigma_ve(ts)
    assert torch.allclose(proc.t_of(sig), ts, atol=1e-6 * max(1.0, proc.t_max))
    assert torch.allclose(proc.snr(ts), 1 / sig**2, rtol=1e-6)
    if proc.variance_preserving:
        assert torch.allclose(proc.signal_scale(ts) ** 2 + proc.noise_scale(ts) ** 2, torch.ones_like(ts), atol=1e-9)


def test_fractional_discrete_time_interpolates_between_steps():
    s = linear_schedule()
    lo, hi = s.sigma_ve(torch.tensor(10.0, dtype=torch.float64)), s.sigma_ve(torch.tensor(11.0, dtype=torch.float64))
    mid = s.sigma_ve(torch.tensor(10.5, dtype=torch.float64))
    assert lo < mid < hi
    assert math.isclose(float(s.t_of(mid)), 10.5, rel_tol=1e-9)


def test_vp_sde_coefficients():
    p = VPLinear()
    t = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    f, g2 = sde_coefficients(p, t)
    assert torch.allclose(f, -p.beta(t) / 2, rtol=1e-8)
    assert torch.allclose(g2, p.beta(t), rtol=1e-6)
    f, g2 = sde_coefficients(VE(), t)
    assert torch.allclose(f, torch.zeros_like(t), atol=1e-12)
    ve = VE()
    assert torch.allclose(g2, 2 * ve.noise_scale(t) ** 2 * math.log(ve.s_max / ve.s_min), rtol=1e-8)


def test_vp_linear_is_limit_of_ddpm_linear():
    """DDPM's linear betas over T = 1000 approximate the VP SDE with beta 0.1..20."""
    d, c = linear_schedule(), VPLinear()
    t = torch.tensor([100, 500, 900])
    assert torch.allclose(d.signal_scale(t).double(), c.signal_scale(t.double() / 1000), rtol=2e-2, atol=1e-3)


def test_config_round_trip_and_errors():
    for p in [linear_schedule(T=10), cosine_schedule(), constant_schedule(0.95, 30), VPLinear(), VE(0.02, 80)]:
        q = make_process(p.config())
        ts = torch.linspace(p.t_max, max(p.t_min, 1.0 if p.discrete else 0.1), 5, dtype=torch.float64)
        assert torch.allclose(p.sigma_ve(ts), q.sigma_ve(ts))
    from difflab.errors import UsageError

    with pytest.raises(UsageError):
        make_schedule("nope")
    with pytest.raises(UsageError):
        make_process({"kind": "nope"})
