"""Per-sample loss weights, one table for every parameterisation.

A weighting is a function lambda(sigma) on the *x0 error*: the loss of a sample is
lambda(sigma) ||x0_hat - x0||^2. Every parameterisation is affine in the network's output
(``Denoiser.x0_per_output``: x0_hat moves by c(sigma, t) per unit of output), so the same loss on the
network's own output error is w ||out - target||^2 with w = lambda(sigma) c^2. That one rule gives
min-SNR-gamma (Hang et al. 2023) as min(SNR, gamma) / SNR for eps, min(SNR, gamma) / (SNR + 1) for v
on a variance-preserving process and min(SNR, gamma) for x0 (SNR = 1 / sigma^2), and EDM's
lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 (Karras et al. 2022) as weight 1 for
``--prediction edm``, whose c = c_out = sigma sigma_data / sqrt(sigma^2 + sigma_data^2).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from difflab.denoiser import SIGMA_DATA, Denoiser

# lambda(sigma, gamma): the weight of the x0 error ("none" weights the output error equally instead)
X0_WEIGHTS = {
    "min-snr": lambda sigma, gamma: (1 / sigma**2).clamp(max=gamma),
    "edm": lambda sigma, gamma: (sigma**2 + SIGMA_DATA**2) / (sigma * SIGMA_DATA) ** 2,
}


def loss_weight(kind: str, den: Denoiser, sigma: torch.Tensor, t: torch.Tensor, gamma: float = 5.0) -> torch.Tensor | None:
    """The per-sample weight [B] (float64) of the network-output MSE for weighting ``kind``; None for "none"."""
    if kind == "none":
        return None
    sigma = torch.as_tensor(sigma, dtype=torch.float64)
    return X0_WEIGHTS[kind](sigma, gamma) * den.x0_per_output(sigma, t) ** 2


def weighted_mse(out: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """mean_i weight_i * mean ||out_i - target_i||^2 (the plain MSE when ``weight`` is None), in float32."""
    if weight is None:
        return F.mse_loss(out.float(), target.float())
    per_sample = (out.float() - target.float()).square().flatten(1).mean(1)
    return (weight.to(per_sample) * per_sample).mean()
