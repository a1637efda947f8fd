"""Per-sample values against a batch: the one broadcasting rule of processes, denoisers, guidance and latents."""

from __future__ import annotations

import torch


def broadcast_to_batch(v: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """A per-sample value [B] (or a scalar) shaped [B, 1, ...] to multiply a batch ``like`` [B, ...],
    in ``like``'s dtype and on its device."""
    v = torch.as_tensor(v, device=like.device)
    return v.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype) if v.ndim else v.to(like.dtype)
