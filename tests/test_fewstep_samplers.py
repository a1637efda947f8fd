"""The multistep solvers (DPM-Solver++, UniPC) and the predictor-corrector against exact answers.

Gaussian data x ~ N(mu, s0^2) has the denoiser D(y, sigma) = (s0^2 y + sigma^2 mu) / (s0^2 + sigma^2)
and the probability-flow ODE the solution y(sigma) = mu + (y0 - mu) sqrt(s0^2 + sigma^2) / sqrt(s0^2 + sigma_0^2).
"""

import math

import pytest
import torch
from torch import nn

from difflab.analytic import GaussianDataNet
from difflab.denoiser import Denoiser
from difflab.noise import SeededNoise
from difflab.processes.continuous import VE, VPLinear
from difflab.processes.gaussian import linear_schedule
from difflab.samplers import SAMPLERS, evaluations, generate, get_sigmas, karras_sigmas

MU, S0 = 0.3, 0.6
PROC = VE(0.002, 80.0)


def exact_denoiser(proc=PROC, net=None):
    return Denoiser(net if net is not None else GaussianDataNet(proc, MU, S0), proc, "eps")


def ode_solution(y0, sigma0, sigma):
    return MU + (y0 - MU) * math.sqrt(S0**2 + sigma**2) / math.sqrt(S0**2 + sigma0**2)


def starts(sigma0, n=64):
    return sigma0 * torch.randn(n, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def grid_error(name, n, **opts):
    """Max error on a Karras grid of n levels against the exact ODE solution to the last level, denoised
    as the samplers' last step does (D is affine in y, so this keeps the solver's order)."""
    den = exact_denoiser()
    sig = karras_sigmas(n, 0.002, 80.0)
    y = starts(80.0)
    ref = den(ode_solution(y, 80.0, float(sig[-2])), sig[-2:-1])
    return float((SAMPLERS[name](den, y, sig, **opts) - ref).abs().max())


@pytest.mark.parametrize("name,opts,order", [
    ("ddim", {}, 1), ("dpmpp-2m", {}, 2), ("dpmpp-3m-full", {}, 3),
    ("unipc", {"order": 1}, 2), ("unipc", {"order": 2}, 3), ("unipc", {"order": 3}, 4),
    ("unipc", {"order": 3, "corrector": False}, 3),
])
def test_solvers_converge_at_their_order(name, opts, order):
    """Doubling the steps divides the error by about 2^order (UniC raises UniP's order by one)."""
    errs = [grid_error(name, n, **opts) for n in (40, 80, 160)]
    ratios = [a / b for a, b in zip(errs, errs[1:])]
    msg = f"{name} {opts}: errors {errs}, observed orders {[round(math.log2(r), 2) for r in ratios]}"
    assert all(0.75 * 2**order < r < 1.4 * 2**order for r in ratios), msg


@pytest.mark.parametrize("a,b", [
    (("dpmpp-3m", {"order": 1}), ("ddim", {})),
    (("unipc", {"order": 1, "corrector": False}), ("ddim", {})),
    (("unipc", {"order": 2, "corrector": False}), ("dpmpp-2m", {})),  # UniP-2 with bh2 is DPM-Solver++(2M)
    (("unipc", {"order": 3, "corrector": False}), ("dpmpp-3m-full", {})),  # both integrate the same quadratic
    (("dpmpp-2m-sde", {"eta": 0.0}), ("dpmpp-2m", {})),
    (("dpmpp-3m-sde", {"eta": 0.0}), ("dpmpp-3m", {})),
    (("dpmpp-3m-sde-full", {"eta": 0.0}), ("dpmpp-3m-full", {})),
    (("dpmpp-2m-sde", {"order": 1}), ("ddpm", {})),  # eta = 1, first order: the ancestral step
])
def test_solver_identities(a, b):
    den = exact_denoiser()
    sig = karras_sigmas(12, 0.002, 80.0)
    y = starts(80.0)
    noise = SeededNoise(torch.arange(len(y)))
    out_a = SAMPLERS[a[0]](den, y, sig, noise=noise, **a[1])
    out_b = SAMPLERS[b[0]](den, y, sig, noise=noise, **b[1])
    assert torch.allclose(out_a, out_b, atol=1e-10), float((out_a - out_b).abs().max())


def test_fewstep_solvers_beat_ddim_at_10_evaluations():
    """On levels uniform in lambda (the new solvers' default grid), at 10 network evaluations."""
    den = exact_denoiser()
    y = starts(80.0, 256)
    ref = ode_solution(y, 80.0, 0.0)

    def err(name, **opts):
        steps = 5 if name == "heun" else 10  # heun: 2 * 5 - 1 = 9 evaluations
        assert evaluations(name, steps) <= 10
        sig = get_sigmas(PROC, steps, "uniform")  # VE's own time is uniform in log sigma
        return float((SAMPLERS[name](den, y * float(sig[0]) / 80.0, sig, **opts) - ref).pow(2).mean().sqrt())

    base = {name: err(name) for name in ("ddim", "euler", "heun")}
    few = {"dpmpp-2m": err("dpmpp-2m"), "dpmpp-3m-full": err("dpmpp-3m-full"), "unipc-2": err("unipc", order=2),
           "unipc-3": err("unipc", order=3)}
    msg = "RMS error to the exact ODE endpoint at 10 NFE: " + ", ".join(
        f"{k} {v:.2e}" for k, v in {**base, **few}.items())
    assert all(v < 0.3 * min(base.values()) for v in few.values()), msg
    assert few["unipc-3"] < 0.1 * min(base.values()), msg


@pytest.mark.parametrize("name", ["dpmpp-2m-sde", "dpmpp-3m-sde"])
@pytest.mark.parametrize("proc", [linear_schedule(T=1000), VE(0.01, 50)], ids=["ddpm", "ve"])
def test_sde_solvers_recover_mean_and_std(name, proc):
    x = generate(exact_denoiser(proc, GaussianDataNet(proc, MU, S0)), 4000, (4,), seed=1, sampler=name,
                 steps=30, dtype=torch.float64, batch_size=4000)
    assert abs(float(x.mean()) - MU) < 0.02 and abs(float(x.std()) - S0) < 0.02, (float(x.mean()), float(x.std()))


def test_pc_has_the_right_std_on_low_dimensional_data():
    """Per-sample norms in the corrector's step size gave std 0.90 here (snr 0.16); the step from the
    expected norms gives the predictor's 0.60."""
    proc = VPLinear()
    den = exact_denoiser(proc, GaussianDataNet(proc, MU, S0))
    x = generate(den, 2000, (4,), seed=1, sampler="pc", steps=100, dtype=torch.float64, batch_size=2000)
    assert abs(float(x.mean()) - MU) < 0.03 and abs(float(x.std()) - S0) < 0.03, float(x.std())


@pytest.mark.parametrize("name", ["dpmpp-3m", "dpmpp-2m-sde", "dpmpp-3m-sde", "unipc", "pc"])
def test_samples_do_not_depend_on_the_batch(name):
    den = exact_denoiser(VPLinear(), GaussianDataNet(VPLinear(), MU, S0))
    sig = get_sigmas(den.process, 8, "geometric").double()
    noise = SeededNoise(torch.arange(12) + 7)
    x = noise.initial((4,), dtype=torch.float64) * float(sig[0])
    whole = SAMPLERS[name](den, x, sig, noise=noise)
    parts = [SAMPLERS[name](den, x[lo:hi], sig, noise=SeededNoise(noise.seeds[lo:hi])) for lo, hi in ((0, 5), (5, 12))]
    assert torch.equal(whole, torch.cat(parts))
    assert torch.equal(generate(den, 12, (4,), seed=3, sampler=name, steps=8, batch_size=12),
                       generate(den, 12, (4,), seed=3, sampler=name, steps=8, batch_size=5))


class Counting(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net, self.calls = net, 0

    def forward(self, *args, **kwargs):
        self.calls += 1
        return self.net(*args, **kwargs)


@pytest.mark.parametrize("name,opts", [("dpmpp-2m", {}), ("dpmpp-3m", {}), ("dpmpp-2m-sde", {}), ("dpmpp-3m-sde", {}),
                                       ("unipc", {}), ("unipc", {"order": 2}), ("pc", {"corrector_steps": 2})])
def test_evaluations_count_the_network_calls(name, opts):
    net = Counting(GaussianDataNet(PROC, MU, S0))
    generate(exact_denoiser(PROC, net), 3, (4,), sampler=name, steps=7, **opts)
    assert net.calls == evaluations(name, 7, **opts) == (7 if name != "pc" else 7 + 6 * 2)


@pytest.mark.parametrize("name,opts", [("unipc", {"order": 4}), ("dpmpp-3m", {"order": 0}),
                                       ("dpmpp-2m-sde", {"eta": -1.0}), ("ddim", {"order": 2})])
def test_bad_options_are_usage_errors(name, opts):
    from difflab.errors import UsageError

    with pytest.raises(UsageError):
        generate(exact_denoiser(), 2, (4,), sampler=name, steps=3, **opts)
