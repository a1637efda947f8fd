"""Part 2 of the series: the Gaussian identities the later parts rest on.

A Gaussian is an affine transform of standard noise, x = A s + t, with mean t and
covariance A A^T. Each function here states one identity; the tests check them
by simulation, and parts 3 to 5 use them (the marginal of the noising chain is
``chain``, the training loss is ``kl_same_variance``).
"""

from __future__ import annotations

import math

import torch


def affine_sample(A: torch.Tensor, t: torch.Tensor, n: int, generator: torch.Generator | None = None):
    """n samples x = A s + t with s ~ N(0, I): a Gaussian with mean t and covariance A A^T."""
    s = torch.randn(n, A.shape[1], generator=generator, dtype=A.dtype)
    return s @ A.T + t


def affine_moments(A: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and covariance of x = A s + t."""
    return t, A @ A.T


def transform(mean: torch.Tensor, cov: torch.Tensor, M: torch.Tensor, b: torch.Tensor):
    """An affine map y = M x + b of x ~ N(mean, cov) is N(M mean + b, M cov M^T)."""
    return M @ mean + b, M @ cov @ M.T


def add_std(sigma: float | torch.Tensor, tau: float | torch.Tensor):
    """Std of the sum of independent spherical Gaussians with stds sigma and tau:
    sqrt(sigma^2 + tau^2) (variances add, standard deviations do not)."""
    return (torch.as_tensor(sigma) ** 2 + torch.as_tensor(tau) ** 2).sqrt()


def chain(mu: torch.Tensor, S: torch.Tensor, T: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """If a ~ N(mu, S) and b ~ N(a, T) then b ~ N(mu, S + T)."""
    return mu, S + T


def scaled_chain_marginal(gammas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Marginal of z_t = gamma_t z_{t-1} + sqrt(1 - gamma_t^2) s started at z_0 = x:
    z_t = gammabar_t x + sigmabar_t s with gammabar_t = prod gamma and
    sigmabar_t = sqrt(1 - gammabar_t^2). Returns (gammabar, sigmabar) for t = 1..T."""
    gammabar = torch.cumprod(gammas.double(), 0)
    return gammabar, (1 - gammabar**2).clamp_min(0).sqrt()


def kl_same_variance(mu: torch.Tensor, nu: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
    """KL(N(mu, sigma^2 I) || N(nu, sigma^2 I)) = ||mu - nu||^2 / (2 sigma^2): with equal variances
    the KL is a scaled squared error, which is why diffusion trains with an MSE."""
    return ((mu - nu) ** 2).sum(-1) / (2 * torch.as_tensor(sigma) ** 2)


def kl_spherical(mu: torch.Tensor, sigma, nu: torch.Tensor, tau) -> torch.Tensor:
    """KL(N(mu, sigma^2 I) || N(nu, tau^2 I)) over the last dimension (d of them)."""
    d = mu.shape[-1]
    sigma, tau = torch.as_tensor(sigma, dtype=mu.dtype), torch.as_tensor(tau, dtype=mu.dtype)
    return 0.5 * (d * (sigma**2 / tau**2) + ((mu - nu) ** 2).sum(-1) / tau**2 - d + 2 * d * torch.log(tau / sigma))


def log_density(x: torch.Tensor, mu: torch.Tensor, sigma) -> torch.Tensor:
    """log N(x; mu, sigma^2 I) summed over the last dimension."""
    d = x.shape[-1]
    sigma = torch.as_tensor(sigma, dtype=x.dtype)
    return -0.5 * (((x - mu) / sigma) ** 2).sum(-1) - d * torch.log(sigma) - 0.5 * d * math.log(2 * math.pi)
