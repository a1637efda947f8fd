"""Multistep exponential integrators in lambda = -log sigma: DPM-Solver++ and UniPC.

In VE coordinates the probability-flow ODE is dy/dlambda = D - y, and the reverse SDE of
"variance" eta (eta = 0: the ODE, eta = 1: the ancestral SDE) is
dy = (1 + eta) (D - y) dlambda + sigma sqrt(2 eta) dW. Over one step h = lambda' - lambda its
exact solution is, with u = (1 + eta) h and D(lambda + tau) = sum_k tau^k/k! D^(k),

    y' = (sigma'/sigma) e^{-eta h} y + sum_k h^k u phi_{k+1}(-u) D^(k) + sigma' sqrt(1 - e^{-2 eta h}) z

(phi_k are the exponential integrators' phi functions). The multistep solvers estimate the
derivatives D^(k) from the denoised images of the previous levels, so each step costs one
network evaluation. The last step (to sigma = 0) returns the denoised image, as everywhere else.
"""

from __future__ import annotations

import math

import torch

from difflab.errors import UsageError
from difflab.samplers.steps import levels, per_sample, step_noise


def _phis(u: float, n: int) -> list[float]:
    """phi_1(-u), ..., phi_n(-u), phi_{k+1}(z) = (phi_k(z) - 1/k!) / z, phi_1(-u) = (1 - e^{-u}) / u."""
    out = [-math.expm1(-u) / u]
    for k in range(1, n):
        out.append((out[-1] - 1 / math.factorial(k)) / -u)
    return out


def _derivatives(hist: list[tuple[float, torch.Tensor]]) -> list[torch.Tensor]:
    """D', D'' (in lambda) at the newest point of ``hist`` [(lambda, D), ...] (one, two or three
    points): the derivatives of their interpolating polynomial, from divided differences."""
    pts = hist[::-1]  # newest first
    if len(pts) == 1:
        return []
    (l0, d0), (l1, d1) = pts[0], pts[1]
    dd01 = (d0 - d1) / (l0 - l1)
    if len(pts) == 2:
        return [dd01]
    l2, d2 = pts[2]
    dd012 = (dd01 - (d1 - d2) / (l1 - l2)) / (l0 - l2)
    # p(tau) = d0 + dd01 tau + dd012 tau (tau + l0 - l1): p'(0), p''(0)
    return [dd01 + dd012 * (l0 - l1), 2 * dd012]


def _dpmpp(denoiser, x, sigmas, cond, noise, callback, order: int, eta: float, full: bool = False):
    if order not in (1, 2, 3):
        raise UsageError(f"DPM-Solver++ order must be 1, 2 or 3, got {order}")
    if eta < 0:
        raise UsageError(f"eta must be at least 0, got {eta}")
    sig = levels(sigmas)
    hist = []  # (lambda, D) of the last `order` levels, newest last
    for i in range(len(sig) - 1):
        s, s_next = sig[i], sig[i + 1]
        x0 = denoiser(x, per_sample(s, x), cond)
        hist = (hist + [(-math.log(s), x0)])[-order:]
        if s_next == 0:
            x = x0
        else:
            h = math.log(s / s_next)
            u = (1 + eta) * h
            phi = _phis(u, 3)
            x = (s_next / s) * math.exp(-eta * h) * x + u * phi[0] * x0
            derivs = _derivatives(hist)
            if len(derivs) == 1 and (order == 2 or full):  # Lu et al.'s 2M: D frozen at its linear
                x = x + u * phi[0] * (h / 2) * derivs[0]  # extrapolation to the step's midpoint
            else:
                if len(derivs) == 2 and not full:  # DPM-Solver++(3M) as Lu et al., k-diffusion and diffusers
                    derivs = [derivs[0], derivs[1] / 2]  # define it: half the quadratic's second derivative
                for k, d in enumerate(derivs):
                    x = x + h ** (k + 1) * u * phi[k + 1] * d
            if eta > 0:
                x = x + s_next * math.sqrt(-math.expm1(-2 * eta * h)) * step_noise(noise, i, x)
        if callback is not None:
            callback({"i": i, "x": x, "sigma": s, "x0": x0})
    return x


@torch.no_grad()
def sample_dpmpp_2m(denoiser, x, sigmas, *, cond=None, noise=None, callback=None, order: int = 2):
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2): y' = (sigma'/sigma) y - expm1(-h) D_hat with D_hat
    the linear extrapolation of the last two denoised images to the step's midpoint (order=1: DDIM)."""
    return _dpmpp(denoiser, x, sigmas, cond, noise, callback, order, 0.0)


@torch.no_grad()
def sample_dpmpp_3m(denoiser, x, sigmas, *, cond=None, noise=None, callback=None, order: int = 3):
    """DPM-Solver++(3M) as Lu et al.'s code, k-diffusion and diffusers (``DPMSolverMultistepScheduler``, solver_order
    3, solver_type "heun", lower_order_final off) compute it: a DDIM step, then the exact step of the line through
    the last two denoised images, then steps whose second-derivative term is half the quadratic's (order 2)."""
    return _dpmpp(denoiser, x, sigmas, cond, noise, callback, order, 0.0)


@torch.no_grad()
def sample_dpmpp_3m_full(denoiser, x, sigmas, *, cond=None, noise=None, callback=None, order: int = 3):
    """difflab's DPM-Solver++(3M): the exact step of the quadratic through the last three denoised images (the
    2M midpoint step before there are three), third order where the peers' :func:`sample_dpmpp_3m` is second."""
    return _dpmpp(denoiser, x, sigmas, cond, noise, callback, order, 0.0, full=True)


@torch.no_grad()
def sample_dpmpp_2m_sde(denoiser, x, sigmas, *, cond=None, noise=None, callback=None,
                        eta: float = 1.0, order: int = 2):
    """DPM-Solver++(2M) SDE: the 2M step of the reverse SDE of variance eta (eta = 1 and order = 1: DDPM)."""
    return _dpmpp(denoiser, x, sigmas, cond, noise, callback, order, eta)


@torch.no_grad()
def sample_dpmpp_3m_sde(denoiser, x, sigmas, *, cond=None, noise=None, callback=None,
                        eta: float = 1.0, order: int = 3):
    """DPM-Solver++(3M) SDE as k-diffusion defines it: the steps of :func:`sample_dpmpp_3m` for the reverse SDE of
    variance eta."""
    return _dpmpp(denoiser, x, sigmas, cond, noise, callback, order, eta)


@torch.no_grad()
def sample_dpmpp_3m_sde_full(denoiser, x, sigmas, *, cond=None, noise=None, callback=None,
                             eta: float = 1.0, order: int = 3):
    """difflab's DPM-Solver++(3M) SDE: the steps of :func:`sample_dpmpp_3m_full` for the reverse SDE of variance eta."""
    return _dpmpp(denoiser, x, sigmas, cond, noise, callback, order, eta, full=True)


# off by measurement (tests/test_peer_samplers.py): on Gaussian data, UniPC-3 on its default (geometric) grid of a
# linear-beta DDPM schedule ends 4x closer to the exact ODE answer without the rule at 10 and 20 steps (RMS 8.3e-3
# vs 3.3e-2, 3.4e-5 vs 1.4e-4) and 1.5x farther at 5 (0.27 vs 0.17)
LOWER_ORDER_FINAL = False


def _uni_step(x, s: float, s_next: float, lam0: float, m0, points):
    """UniPC-bh2's update of x from level s to s_next (Zhao et al. 2023, data prediction): DDIM from
    m0 = D at s, plus B(h) sum_k rho_k (D_k - m0) / r_k over ``points`` [(lambda_k, D_k)] with
    r_k = (lambda_k - lambda) / h, rho solving the order conditions sum_k rho_k r_k^(i-1) = i! h phi_{i+1}(-h)
    / B(h), B(h) = 1 - e^{-h}. The predictor UniP passes the previous levels, the corrector UniC also the new
    one. A single rho is the paper's 1/2 (the conditions' h -> 0 limit), which makes UniP-2 DPM-Solver++(2M)."""
    h = math.log(s / s_next)
    out = (s_next / s) * x - math.expm1(-h) * m0
    if not points:
        return out
    rs = [(lam - lam0) / h for lam, _ in points]
    if len(points) == 1:
        rho = [0.5]
    else:
        phi = _phis(h, len(points) + 1)
        b = [h * phi[i] * math.factorial(i) / -math.expm1(-h) for i in range(1, len(points) + 1)]
        R = torch.tensor([[r**i for r in rs] for i in range(len(points))], dtype=torch.float64)
        rho = torch.linalg.solve(R, torch.tensor(b, dtype=torch.float64)).tolist()
    return out - math.expm1(-h) * sum(c * (m - m0) / r for c, r, (_, m) in zip(rho, rs, points))


@torch.no_grad()
def sample_unipc(denoiser, x, sigmas, *, cond=None, noise=None, callback=None, order: int = 3,
                 corrector: bool = True, lower_order_final: bool = LOWER_ORDER_FINAL):
    """UniPC-bh2 (Zhao et al. 2023): a multistep predictor UniP of ``order`` (default 3, the paper's choice
    for unconditional sampling; 2 for guided), then the corrector UniC, which reuses the evaluation at the
    predicted point, so the order rises by one at no extra cost. The corrector runs on every step but the
    last (whose output is the denoised image): one evaluation per level. order=1, corrector=False: DDIM.
    ``lower_order_final``: the predictor's order is at most the steps left (diffusers' rule, which its
    ``UniPCMultistepScheduler`` applies by default: the second-to-last step of order 3 is of order 2)."""
    if order not in (1, 2, 3):
        raise UsageError(f"UniPC order must be 1, 2 or 3, got {order}")
    sig = levels(sigmas)
    hist = []  # (lambda, D) of the last `order` levels, newest last; D taken at the predicted points
    x_prev, used = x, 1  # the last step's start and predictor order (the corrector redoes it with one point more)
    for i in range(len(sig) - 1):
        s, s_next = sig[i], sig[i + 1]
        x0 = denoiser(x, per_sample(s, x), cond)
        if corrector and hist and s_next > 0:  # redo the last step with the new evaluation among the points
            lam0, m0 = hist[-1]
            x = _uni_step(x_prev, sig[i - 1], s, lam0, m0, hist[len(hist) - used:-1] + [(-math.log(s), x0)])
        hist = (hist + [(-math.log(s), x0)])[-order:]
        if s_next == 0:
            x = x0
        else:
            used = min(len(hist), len(sig) - 1 - i) if lower_order_final else len(hist)
            x_prev = x
            x = _uni_step(x, s, s_next, hist[-1][0], x0, hist[len(hist) - used:-1])
        if callback is not None:
            callback({"i": i, "x": x, "sigma": s, "x0": x0})
    return x
