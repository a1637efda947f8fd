"""Building blocks shared by the networks: time embedding, residual blocks, attention, resampling.

Tensors are image-shaped ``[B, C, H, W]`` (either memory format) unless said otherwise. Nothing
here assumes a dtype: blocks run under ``torch.autocast`` and with bf16/fp16 weights alike.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .norm_act import group_norm_act


def num_groups(channels: int, max_groups: int = 32) -> int:
    """The largest divisor of ``channels`` that is at most ``max_groups`` (32 for wide layers)."""
    return next(g for g in range(min(max_groups, channels), 0, -1) if channels % g == 0)


class GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` (same parameters and state-dict keys) with an optional SiLU after it and an optional
    per-sample ``* (1 + scale) + shift`` between the two, run as one fused op on CPUs (``norm_act``)."""

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, act: bool = False) -> None:
        super().__init__(num_groups, num_channels, eps=eps)
        self.act = act

    def forward(self, x: torch.Tensor, scale: torch.Tensor | None = None, shift: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` [B, C, H, W]; ``scale``, ``shift`` broadcastable as [B, C] (or None)."""
        return group_norm_act(x, self.weight, self.bias, self.num_groups, self.eps, scale, shift, self.act)

    def extra_repr(self) -> str:
        return super().extra_repr() + (", act=SiLU" if self.act else "")


def group_norm(channels: int, max_groups: int = 32, act: bool = False) -> GroupNorm:
    """GroupNorm with ``max_groups`` groups, or fewer when ``channels`` is not a multiple of it; SiLU after
    it when ``act``."""
    return GroupNorm(num_groups(channels, max_groups), channels, eps=1e-5, act=act)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``F.scaled_dot_product_attention``, in float32 when it would differentiate bf16 on a CPU.

    The CPU flash-attention backward is about 7x slower in bf16 than in float32 (20 ms against
    2.9 ms per call on mnist-small, one thread), while the forward costs the same in both.
    """
    if q.dtype == torch.bfloat16 and q.device.type == "cpu" and torch.is_grad_enabled() and q.requires_grad:
        with torch.autocast("cpu", enabled=False):
            return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=attn_mask).to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)


def zero_init(module: nn.Module) -> nn.Module:
    """Zero all parameters of ``module`` so that a residual branch starts as the identity."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of a real-valued network time ``t`` [B] -> float32 [B, dim].

    DDPM (Ho et al.) convention: ``[sin(t w_i), cos(t w_i)]`` with frequencies
    ``w_i = max_period ** (-i / (dim/2 - 1))``, i = 0 .. dim/2 - 1 (the fastest is 1 rad per unit of t).
    Smooth in t, so fractional times (continuous models pass 1000 * t) are fine.
    """
    half = dim // 2
    exponent = torch.arange(half, device=t.device, dtype=torch.float32) / max(half - 1, 1)
    args = t.float()[:, None] * torch.exp(-math.log(max_period) * exponent)[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class ResBlock(nn.Module):
    """Pre-activation residual block: GroupNorm, SiLU, 3x3 conv, + embedding, GroupNorm, SiLU, dropout,
    3x3 conv (zero-initialised), plus a 1x1-conv shortcut when the channel count changes.

    The embedding (time, plus class when conditioned) enters either as a per-channel shift added after
    the first conv (DDPM) or, with ``use_scale_shift_norm``, as ``norm(h) * (1 + scale) + shift`` (ADM).
    ``forward`` takes the embedding already passed through SiLU, computed once per network call.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_channels: int,
        dropout: float = 0.0,
        use_scale_shift_norm: bool = False,
        max_groups: int = 32,
    ) -> None:
        super().__init__()
        self.use_scale_shift_norm = use_scale_shift_norm
        self.norm1 = group_norm(in_channels, max_groups, act=True)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.emb_proj = nn.Linear(emb_channels, out_channels * (2 if use_scale_shift_norm else 1))
        self.norm2 = group_norm(out_channels, max_groups, act=True)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_init(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb_act: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.norm1(x))
        e = self.emb_proj(emb_act)
        if self.use_scale_shift_norm:
            scale, shift = e.chunk(2, dim=1)
            h = self.norm2(h, scale, shift)
        else:
            h = self.norm2(h + e[:, :, None, None])
        h = self.conv2(self.dropout(h))
        return self.skip(x) + h


def _tokens(x: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, H*W, C] (a view for channels_last input)."""
    return x.flatten(2).transpose(1, 2)


def _untokens(h: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[B, H*W, C] -> [B, C, H, W] shaped like ``like`` (a channels_last view)."""
    return h.transpose(1, 2).reshape(like.shape)


def _split_heads(h: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, L, C] -> [B, heads, L, C / heads]."""
    b, n, c = h.shape
    return h.view(b, n, heads, c // heads).transpose(1, 2)


class SelfAttention(nn.Module):
    """Multi-head self-attention over the pixels of a feature map (residual, zero-initialised output)."""

    def __init__(self, channels: int, num_heads: int = 1, max_groups: int = 32) -> None:
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"attention: {channels} channels do not split into {num_heads} heads")
        self.num_heads = num_heads
        self.norm = group_norm(channels, max_groups)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = zero_init(nn.Linear(channels, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        qkv = self.qkv(_tokens(self.norm(x)))  # [B, HW, 3C]
        q, k, v = qkv.view(b, -1, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        h = attention(q, k, v)  # [B, heads, HW, C/heads]
        h = self.proj(h.transpose(1, 2).reshape(b, -1, c))
        return x + _untokens(h, x)


class CrossAttention(nn.Module):
    """Pixels attend to context tokens (e.g. a text encoder's token embeddings); residual, zero-init output.

    ``context`` [B, L, D] must already carry the network's learned null token in position 0 and
    ``attn_mask`` is None or bool [B, 1, 1, L] (True = attend); see ``UNet`` for the null semantics.
    """

    def __init__(self, channels: int, context_dim: int, num_heads: int = 1, max_groups: int = 32) -> None:
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"cross-attention: {channels} channels do not split into {num_heads} heads")
        self.num_heads = num_heads
        self.norm = group_norm(channels, max_groups)
        self.q = nn.Linear(channels, channels)
        self.kv = nn.Linear(context_dim, 2 * channels)
        self.proj = zero_init(nn.Linear(channels, channels))

    def forward(self, x: torch.Tensor, context: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        b, c = x.shape[:2]
        q = _split_heads(self.q(_tokens(self.norm(x))), self.num_heads)
        kv = self.kv(context)  # [B, L, 2C]
        k, v = kv.view(b, -1, 2, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        h = attention(q, k, v, attn_mask)
        h = self.proj(h.transpose(1, 2).reshape(b, -1, c))
        return x + _untokens(h, x)


class Downsample(nn.Module):
    """Halve the resolution with a 3x3 stride-2 convolution."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Double the resolution: nearest-neighbour upsampling then a 3x3 convolution."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
