"""Part 3 of the series: Gaussian diffusion with T discrete steps (DDPM).

Notation (series / DDPM paper):

- gamma_t = sqrt(alpha_t) = sqrt(1 - beta_t): per-step signal scale,
  z_t = gamma_t z_{t-1} + sqrt(1 - gamma_t^2) s
- gammabar_t = gamma_1 ... gamma_t = sqrt(alphabar_t): cumulative signal scale
- sigmabar_t = sqrt(1 - gammabar_t^2) = sqrt(1 - alphabar_t): cumulative noise std,
  z_t = gammabar_t x + sigmabar_t s
- SNR(t) = gammabar_t^2 / sigmabar_t^2

Every Gaussian process (this one and the continuous ones of part 4) keeps the
contract of :class:`GaussianProcess`: ``signal_scale(t)`` (gammabar(t)) and
``noise_scale(t)`` (sigmabar(t)) at any real t. Samplers work in the VE coordinates
y = z / gammabar with noise level ``sigma_ve = sigmabar / gammabar`` (the "sigma" of
every sampler and denoiser), where every Gaussian process is the same up to a change
of time; ``t_of`` maps a noise level back to the process's time.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from difflab.broadcast import broadcast_to_batch
from difflab.errors import UsageError


class GaussianProcess:
    """z_t = gammabar(t) x + sigmabar(t) s. Subclasses define signal_scale (gammabar), noise_scale
    (sigmabar) and t_of."""

    discrete: bool = False
    variance_preserving: bool = True
    t_min: float = 0.0
    t_max: float = 1.0

    def signal_scale(self, t: torch.Tensor) -> torch.Tensor:
        """gammabar(t) = sqrt(alphabar(t)), the signal scale of the marginal."""
        raise NotImplementedError

    def noise_scale(self, t: torch.Tensor) -> torch.Tensor:
        """sigmabar(t) = sqrt(1 - alphabar(t)) for VP processes, the noise std of the marginal."""
        raise NotImplementedError

    def t_of(self, sigma_ve: torch.Tensor) -> torch.Tensor:
        """Inverse of ``sigma_ve``: the time at which sigmabar / gammabar equals ``sigma_ve``."""
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        raise NotImplementedError

    # Derived quantities: the same for every process.
    def sigma_ve(self, t: torch.Tensor) -> torch.Tensor:
        """Noise level in VE coordinates, sigmabar / gammabar = 1 / sqrt(SNR)."""
        return self.noise_scale(t) / self.signal_scale(t)

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        """SNR(t) = gammabar_t^2 / sigmabar_t^2."""
        return (self.signal_scale(t) / self.noise_scale(t)) ** 2

    def marginal(self, x: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """z_t = gammabar_t x + sigmabar_t s (q(z_t | x) in one draw)."""
        return broadcast_to_batch(self.signal_scale(t), x) * x + broadcast_to_batch(self.noise_scale(t), x) * noise

    def net_time(self, t: torch.Tensor) -> torch.Tensor:
        """The time the network sees: the step index for discrete processes, 1000 t otherwise."""
        return t.float() if self.discrete else 1000.0 * t.float()

    def sample_t(self, n: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        """Training times: t uniform over (t_min, t_max]."""
        u = torch.rand(n, generator=generator, device=device, dtype=torch.float64)
        return (self.t_min + (self.t_max - self.t_min) * (1 - u)).to(torch.float32)

    def sigma_max(self) -> float:
        return float(self.sigma_ve(torch.tensor(self.t_max, dtype=torch.float64)))

    def sigma_min(self) -> float:
        return float(self.sigma_ve(torch.tensor(self.t_min, dtype=torch.float64)))

    def prior_std(self) -> float:
        """Std of the prior in VE coordinates: z_T ~ N(0, I) gives y_T = z_T / gammabar_T, so
        sqrt(sigma_ve^2 + 1) for VP; sigma_max for VE (the data's own spread is neglected)."""
        s = self.sigma_max()
        return math.sqrt(s * s + 1) if self.variance_preserving else s

    def timesteps(self, steps: int) -> torch.Tensor:
        """A decreasing grid of ``steps`` times from t_max (uniform in t; integer for discrete)."""
        raise NotImplementedError


class DiscreteSchedule(GaussianProcess):
    """T discrete steps with per-step signal scales gamma_1..gamma_T (DDPM).

    t runs over 0..T with gammabar_0 = 1 (t = 0 is the data). Non-integer t, needed
    by samplers that visit noise levels between the steps, interpolate log sigma_ve
    linearly between neighbouring steps.
    """

    discrete = True

    def __init__(self, gammas: torch.Tensor, name: str = "custom", params: dict | None = None):
        gammas = torch.as_tensor(gammas, dtype=torch.float64)
        if gammas.ndim != 1 or len(gammas) < 1:
            raise UsageError("a discrete schedule needs a 1-D tensor of per-step gammas")
        if not bool(((gammas > 0) & (gammas < 1)).all()):
            raise UsageError("every per-step gamma must lie strictly between 0 and 1")
        self.name = name
        self.params = dict(params or {})
        self.T = len(gammas)
        self.t_min, self.t_max = 0.0, float(self.T)
        self._gamma = torch.cat([torch.ones(1, dtype=torch.float64), gammas])  # index t = 0..T
        self._gammabar = torch.cumprod(self._gamma, 0)  # gammabar_0 = 1 includes no gamma; gammabar_t includes gamma_t
        self._sigmabar = (1 - self._gammabar**2).clamp_min(0).sqrt()
        self._log_sigma_ve = torch.log(self._sigmabar[1:] / self._gammabar[1:])  # t = 1..T, increasing
        self._tables: dict[str, torch.Tensor] = {}

    # --- the series' quantities, indexed by integer t -------------------------------------------
    def gamma(self, t: torch.Tensor) -> torch.Tensor:
        """gamma_t = sqrt(alpha_t) = sqrt(1 - beta_t), per step (t integer, 1..T)."""
        return self._gamma.to(_dev(t))[t.long()]

    def beta(self, t: torch.Tensor) -> torch.Tensor:
        """beta_t = 1 - gamma_t^2, the variance added at step t (the "large" sampling variance)."""
        return 1 - self.gamma(t) ** 2

    def gammabar(self, t: torch.Tensor) -> torch.Tensor:
        """gammabar_t = gamma_1 ... gamma_t = sqrt(alphabar_t) (t integer, 0..T)."""
        return self._gammabar.to(_dev(t))[t.long()]

    def sigmabar(self, t: torch.Tensor) -> torch.Tensor:
        """sigmabar_t = sqrt(1 - gammabar_t^2) = sqrt(1 - alphabar_t)."""
        return self._sigmabar.to(_dev(t))[t.long()]

    def posterior_variance(self, t: torch.Tensor) -> torch.Tensor:
        """sigma_tilde_t^2 = (1 - gammabar_{t-1}^2) / (1 - gammabar_t^2) (1 - gamma_t^2): the variance
        of q(z_{t-1} | z_t, x), the "small" sampling variance."""
        return (1 - self.gammabar(t - 1) ** 2) / (1 - self.gammabar(t) ** 2) * self.beta(t)

    def posterior_mean(self, z_t: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """mu_tilde(z_t, x) of q(z_{t-1} | z_t, x), in terms of the clean image x:
        gammabar_{t-1} beta_t / sigmabar_t^2 x + gamma_t sigmabar_{t-1}^2 / sigmabar_t^2 z_t."""
        gb_prev, sb2 = self.gammabar(t - 1), self.sigmabar(t) ** 2
        c_x = gb_prev * self.beta(t) / sb2
        c_z = self.gamma(t) * (1 - gb_prev**2) / sb2
        return broadcast_to_batch(c_x, x) * x + broadcast_to_batch(c_z, z_t) * z_t

    def posterior_mean_from_noise(self, z_t: torch.Tensor, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The same mean in terms of the noise s_t (the series' form):
        mu_tilde = (1 / gamma_t) (z_t - (1 - gamma_t^2) / sigmabar_t s_t).
        (The published slides divide by sqrt(1 - gammabar_t); the right divisor is sigmabar_t.)"""
        c = self.beta(t) / self.sigmabar(t)
        return (z_t - broadcast_to_batch(c, s) * s) / broadcast_to_batch(self.gamma(t), z_t)

    def step(self, z_prev: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """One noising step z_t = gamma_t z_{t-1} + sqrt(1 - gamma_t^2) s."""
        g = self.gamma(t)
        return broadcast_to_batch(g, z_prev) * z_prev + broadcast_to_batch((1 - g**2).sqrt(), noise) * noise

    # --- the GaussianProcess contract (real-valued t) -------------------------------------------
    # signal_scale and noise_scale go through sigma_ve, which interpolates between steps; at integer t
    # they equal the tables gammabar(t) and sigmabar(t) to float64 rounding, with no data-dependent branch (no
    # host-device sync, so sampling loops can be captured in CUDA graphs).
    def signal_scale(self, t: torch.Tensor) -> torch.Tensor:
        sve = self.sigma_ve(torch.as_tensor(t)).double()
        return (1 / torch.sqrt(1 + sve**2)).to(_float(torch.as_tensor(t)))

    def noise_scale(self, t: torch.Tensor) -> torch.Tensor:
        sve = self.sigma_ve(torch.as_tensor(t)).double()
        return (sve / torch.sqrt(1 + sve**2)).to(_float(torch.as_tensor(t)))

    def _table(self, device: torch.device) -> torch.Tensor:
        """log sigma_ve of steps 1..T on ``device``, copied once per device (a copy from pageable host
        memory in every call would stall the GPU queue)."""
        key = str(device)
        if key not in self._tables:
            self._tables[key] = self._log_sigma_ve.to(device)
        return self._tables[key]

    def sigma_ve(self, t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t)
        ls = self._table(_dev(t))
        tf = t.to(torch.float64).clamp(1.0, float(self.T))
        lo = tf.floor().long().clamp(1, self.T - 1) if self.T > 1 else tf.long()
        w = (tf - lo) if self.T > 1 else torch.zeros_like(tf)
        hi = (lo + 1).clamp(max=self.T)
        out = torch.exp(ls[lo - 1] * (1 - w) + ls[hi - 1] * w)
        out = torch.where(t.to(torch.float64) <= 0, torch.zeros_like(out), out)
        return out.to(_float(t))

    def t_of(self, sigma_ve: torch.Tensor) -> torch.Tensor:
        s = torch.as_tensor(sigma_ve, dtype=torch.float64)
        ls = self._table(s.device)
        log_s = torch.log(s.clamp_min(1e-30))
        idx = torch.searchsorted(ls, log_s.reshape(-1).contiguous()).reshape(s.shape).clamp(1, max(self.T - 1, 1))
        lo, hi = ls[idx - 1], ls[idx.clamp(max=self.T - 1)]
        w = ((log_s - lo) / (hi - lo).clamp_min(1e-30)).clamp(0, 1) if self.T > 1 else torch.zeros_like(s)
        t = idx.to(torch.float64) + w
        t = torch.where(log_s <= ls[0], torch.ones_like(t), t)
        t = torch.where(s <= 0, torch.zeros_like(t), t)
        # snap to integers within float error, so grids of integer steps hit the table exactly
        t = torch.where((t - t.round()).abs() < 1e-6, t.round(), t)
        return t.to(_float(torch.as_tensor(sigma_ve)))

    def sample_t(self, n: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        """Training steps: t uniform over 1..T."""
        return torch.randint(1, self.T + 1, (n,), generator=generator, device=device).float()

    def timesteps(self, steps: int) -> torch.Tensor:
        """``steps`` integer steps from T down, evenly spaced ("trailing" spacing, so t = T is always
        visited), as in improved-diffusion's respacing: the schedule is recomputed on the
        subsequence and the sampler never changes."""
        if not 1 <= steps <= self.T:
            raise UsageError(f"--steps must be between 1 and T={self.T} for this model, got {steps}")
        ts = torch.round(torch.linspace(self.T, 0, steps + 1, dtype=torch.float64))[:-1]
        return ts

    def config(self) -> dict[str, Any]:
        return {"kind": "discrete", "schedule": self.name, **self.params}

    def describe(self) -> str:
        gb = float(self._gammabar[-1])
        return f"{self.name} schedule, T={self.T}: gammabar_T = {gb:.4g} (sigmabar_T = {float(self._sigmabar[-1]):.4g})"


def _dev(t) -> torch.device:
    return t.device if isinstance(t, torch.Tensor) else torch.device("cpu")


def _float(t: torch.Tensor) -> torch.dtype:
    return t.dtype if t.is_floating_point() else torch.float32


# --- schedules ---------------------------------------------------------------------------------
def linear_schedule(T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> DiscreteSchedule:
    """DDPM's linear betas, 1e-4 to 0.02 over T = 1000 steps (scaled by 1000 / T for other T, at most 0.999)."""
    scale = 1000.0 / T
    betas = torch.linspace(beta_start * scale, beta_end * scale, T, dtype=torch.float64).clamp(max=0.999)
    return DiscreteSchedule((1 - betas).sqrt(), "linear", {"T": T, "beta_start": beta_start, "beta_end": beta_end})


def cosine_schedule(T: int = 1000, offset: float = 0.008, max_beta: float = 0.999) -> DiscreteSchedule:
    """Nichol & Dhariwal's cosine schedule: gammabar_t^2 = cos^2((t/T + s) / (1 + s) pi / 2), normalised."""
    f = lambda u: torch.cos((u + offset) / (1 + offset) * math.pi / 2) ** 2  # noqa: E731
    u = torch.arange(T + 1, dtype=torch.float64) / T
    abar = f(u) / f(torch.zeros(1, dtype=torch.float64))
    betas = (1 - abar[1:] / abar[:-1]).clamp(max=max_beta)
    return DiscreteSchedule((1 - betas).sqrt(), "cosine", {"T": T, "offset": offset})


def sigmoid_schedule(T: int = 1000, start: float = -3.0, end: float = 3.0, tau: float = 1.0) -> DiscreteSchedule:
    """Sigmoid schedule (Jabri et al.): gammabar_t^2 follows a rescaled sigmoid of t/T."""
    sig = lambda v: torch.sigmoid(torch.as_tensor(v, dtype=torch.float64))  # noqa: E731
    u = torch.arange(T + 1, dtype=torch.float64) / T
    v0, v1 = sig(start / tau), sig(end / tau)
    abar = ((-sig((u * (end - start) + start) / tau) + v1) / (v1 - v0)).clamp(1e-9, 1)
    betas = (1 - abar[1:] / abar[:-1]).clamp(1e-8, 0.999)
    return DiscreteSchedule((1 - betas).sqrt(), "sigmoid", {"T": T, "start": start, "end": end, "tau": tau})


def constant_schedule(gamma: float = 0.9, T: int = 120) -> DiscreteSchedule:
    """The series' constant gamma: z_t = gamma z_{t-1} + sqrt(1 - gamma^2) s. gamma = 0.9 over 120
    steps reaches gammabar_T = 3e-6 (converged); 0.99 over 120 steps only 0.30 (not converged)."""
    return DiscreteSchedule(torch.full((T,), float(gamma), dtype=torch.float64), "constant", {"T": T, "gamma": gamma})


SCHEDULES = {"linear": linear_schedule, "cosine": cosine_schedule, "sigmoid": sigmoid_schedule, "constant": constant_schedule}


def register_schedule(name: str, build) -> None:
    """Make ``make_schedule(name, **params)`` call ``build(**params)``: schedules defined above this module
    (``difflab.interop`` registers the schedule of a diffusers scheduler config as "diffusers"), so the
    schedule a process config names is rebuilt without this module importing its maker."""
    SCHEDULES[name] = build


def make_schedule(name: str, **kwargs) -> DiscreteSchedule:
    if name not in SCHEDULES:
        hint = " (import difflab.interop to read diffusers schedules)" if name == "diffusers" else ""
        raise UsageError(f"unknown schedule '{name}'; choose one of {', '.join(SCHEDULES)}{hint}")
    return SCHEDULES[name](**kwargs)
