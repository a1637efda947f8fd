"""Samplers named for a peer's method compute the peer's method: ``dpmpp-3m``/``dpmpp-3m-sde`` equal diffusers'
``DPMSolverMultistepScheduler`` (solver_order 3) and ``unipc`` with ``lower_order_final`` equals diffusers'
``UniPCMultistepScheduler``, step for step, on exact Gaussian data (the denoiser in closed form)."""

from __future__ import annotations

import math

import pytest
import torch

from difflab.samplers import SAMPLERS

diffusers = pytest.importorskip("diffusers")

MU, S0 = 0.3, 0.7


def denoiser(y, sigma, cond=None):
    """E[x | y] for x ~ N(MU, S0^2) in VE coordinates."""
    s = sigma.double().reshape(-1, *[1] * (y.ndim - 1))
    return (S0**2 * y.double() + s**2 * MU) / (S0**2 + s**2)


def diffusers_loop(sched, noise, steps, step_noise=None):
    """diffusers' loop on the exact model (its epsilon prediction from the denoiser); returns the samples and
    the grid of VE noise levels it visited."""
    sched.set_timesteps(steps)
    sig = sched.sigmas.double()
    x = noise.clone()
    for i, t in enumerate(sched.timesteps):
        a = 1 / math.sqrt(1 + float(sig[i]) ** 2)
        x0 = denoiser(x.double() / a, sig[i].expand(len(x)))
        eps = ((x.double() - a * x0) / (float(sig[i]) * a)).float()
        kw = {"variance_noise": step_noise[i]} if step_noise is not None else {}
        x = sched.step(eps, t, x, **kw).prev_sample
    return x.double(), sig


def ours(name, sig, start, **opts):
    y = start.double() * math.sqrt(1 + float(sig[0]) ** 2)  # z ~ N(0, I) is y = z / gammabar
    return SAMPLERS[name](denoiser, y, sig, **opts)


NOISE = torch.randn(32, 1, 4, 4, generator=torch.Generator().manual_seed(0))
DPM = dict(algorithm_type="dpmsolver++", solver_order=3, solver_type="heun", lower_order_final=False)


@pytest.mark.parametrize("steps", [3, 5, 10, 25])
def test_dpmpp_3m_is_diffusers_third_order_solver(steps):
    ref, sig = diffusers_loop(diffusers.DPMSolverMultistepScheduler(**DPM), NOISE, steps)
    assert torch.allclose(ours("dpmpp-3m", sig, NOISE), ref, atol=2e-5, rtol=1e-5)
    if steps > 3:  # difflab's own variant is another method
        assert float((ours("dpmpp-3m-full", sig, NOISE) - ref).abs().max()) > 1e-3


def _sde_noise(steps):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(NOISE.shape, generator=g) for _ in range(steps)]


@pytest.mark.parametrize("steps", [2, 3])
def test_dpmpp_3m_sde_is_diffusers_sde_solver_up_to_second_order(steps):
    """diffusers' third-order SDE step weights its D2 by (1 - e^-u - u)/u^2 - 1/2, which tends to -1 as the step
    shrinks (k-diffusion's tends to 0, as the exact step's does): the schedulers agree only before it."""
    zs = _sde_noise(steps)
    sched = diffusers.DPMSolverMultistepScheduler(**{**DPM, "algorithm_type": "sde-dpmsolver++"})
    ref, sig = diffusers_loop(sched, NOISE, steps, zs)
    got = ours("dpmpp-3m-sde", sig, NOISE, noise=lambda i, like: zs[i].double())
    assert torch.allclose(got, ref, atol=2e-5, rtol=1e-5), float((got - ref).abs().max())


def kdiffusion_3m_sde(y, sig, zs, eta=1.0):
    """k-diffusion's definition of DPM-Solver++(3M) SDE, restated: with t = -log sigma, h the step, u = (1 + eta) h,
    r the previous steps over h, d1 = slope and d2 = curvature of the last three denoised images in units of h,
    y' = e^-u y + (1 - e^-u) D + a d1 - b d2 + noise, a = 1 - (1 - e^-u) / u, b = a / u - 1/2."""
    hist, steps = [], []
    for i in range(len(sig) - 1):
        s, s_next = float(sig[i]), float(sig[i + 1])
        d = denoiser(y, torch.full((len(y),), s, dtype=torch.float64))
        if s_next == 0:
            return d
        h = math.log(s / s_next)
        u = (1 + eta) * h
        y = math.exp(-u) * y - math.expm1(-u) * d
        a = 1 + math.expm1(-u) / u
        if len(hist) >= 2:
            r0, r1 = steps[-1] / h, steps[-2] / h
            s0, s1 = (d - hist[-1]) / r0, (hist[-1] - hist[-2]) / r1
            d1, d2 = s0 + (s0 - s1) * r0 / (r0 + r1), (s0 - s1) / (r0 + r1)
            y = y + a * d1 - (a / u - 0.5) * d2
        elif hist:
            y = y + a * (d - hist[-1]) / (steps[-1] / h)
        y = y + s_next * math.sqrt(-math.expm1(-2 * eta * h)) * zs[i].double()
        hist, steps = hist + [d], steps + [h]
    return y


@pytest.mark.parametrize("eta", [1.0, 0.5])
@pytest.mark.parametrize("steps", [4, 10, 25])
def test_dpmpp_3m_sde_is_kdiffusions_definition(steps, eta):
    zs = _sde_noise(steps)
    sched = diffusers.DPMSolverMultistepScheduler(**DPM)
    sched.set_timesteps(steps)
    sig = sched.sigmas.double()
    y = NOISE.double() * math.sqrt(1 + float(sig[0]) ** 2)
    got = SAMPLERS["dpmpp-3m-sde"](denoiser, y, sig, noise=lambda i, like: zs[i].double(), eta=eta)
    assert torch.allclose(got, kdiffusion_3m_sde(y, sig, zs, eta), atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("steps", [3, 5, 10, 20])
def test_unipc_lower_order_final_is_diffusers_unipc(steps):
    ref, sig = diffusers_loop(diffusers.UniPCMultistepScheduler(solver_order=3), NOISE, steps)  # its default rule
    assert torch.allclose(ours("unipc", sig, NOISE, lower_order_final=True), ref, atol=2e-5, rtol=1e-5)
    if steps > 3:  # the rule changes the second-to-last step of order 3
        assert float((ours("unipc", sig, NOISE) - ref).abs().max()) > 1e-3


def test_unipc_default_is_measured():
    """The default (no lower-order final steps) is closer to the exact ODE answer at 10 and 20 steps, not at 5,
    for UniPC-3 on its own grid of a linear-beta DDPM schedule."""
    from difflab.analytic import GaussianDataNet
    from difflab.denoiser import Denoiser
    from difflab.processes.gaussian import linear_schedule
    from difflab.samplers import get_sigmas
    from difflab.samplers.multistep import LOWER_ORDER_FINAL

    proc = linear_schedule(T=1000)
    den = Denoiser(GaussianDataNet(proc, MU, S0), proc, "eps")
    y = 80.0 * torch.randn(256, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def err(steps, lof):
        sig = get_sigmas(proc, steps, "geometric")
        exact = MU + (y - MU) * S0 / math.sqrt(S0**2 + float(sig[0]) ** 2)
        return float((SAMPLERS["unipc"](den, y, sig, lower_order_final=lof) - exact).pow(2).mean().sqrt())

    assert not LOWER_ORDER_FINAL
    assert err(10, False) < err(10, True) / 3 and err(20, False) < err(20, True) / 3
    assert err(5, True) < err(5, False)
