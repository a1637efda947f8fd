"""The DDPM/ADM UNet: the production network with sinusoidal time embedding and attention.

Layout as in Ho et al. (2020) and Dhariwal & Nichol (2021): a 3x3 stem, ``len(channel_mult)`` levels of
``num_res_blocks`` residual blocks (with self-attention at the feature-map sizes listed in
``attention_resolutions``) separated by stride-2 convolutions, a middle block (res, attention, res),
and a mirrored decoder with ``num_res_blocks + 1`` blocks per level fed by skip connections.

Conditions (SPEC part 5):

- class labels: an embedding table of ``num_classes + 1`` rows added to the time embedding; row
  ``num_classes`` is the null label, used for ``class_labels=None``.
- context tokens [B, L, D] (a frozen text encoder's output): cross-attention after every
  self-attention. The network owns a learned null token that is always in the key/value set, so
  ``context=None`` (attend to the null token only) equals a context whose ``context_mask`` row is all
  False. To drop the prompt of some samples in a batch (classifier-free guidance), set their mask rows
  to False; there is no NaN from an empty softmax.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .layers import (
    CrossAttention,
    Downsample,
    ResBlock,
    SelfAttention,
    Upsample,
    group_norm,
    timestep_embedding,
    zero_init,
)
from .layout import match_layout, weight_layout


class _Stage(nn.Module):
    """One residual block, optionally followed by self- and cross-attention and a resampler."""

    def __init__(
        self,
        res: ResBlock,
        attn: SelfAttention | None = None,
        cross: CrossAttention | None = None,
        resample: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.res, self.attn, self.cross, self.resample = res, attn, cross, resample

    def forward(
        self, h: torch.Tensor, emb_act: torch.Tensor, context: torch.Tensor | None, mask: torch.Tensor | None
    ) -> torch.Tensor:
        h = self.res(h, emb_act)
        if self.attn is not None:
            h = self.attn(h)
        if self.cross is not None and context is not None:
            h = self.cross(h, context, mask)
        if self.resample is not None:
            h = self.resample(h)
        return h


def _heads(channels: int, num_heads: int, head_channels: int) -> int:
    if head_channels > 0:
        if channels % head_channels:
            raise ValueError(f"UNet: {channels} channels are not a multiple of head_channels={head_channels}")
        return channels // head_channels
    return num_heads


class UNet(nn.Module):
    """DDPM/ADM UNet, ``net(x, t, class_labels=None, context=None, context_mask=None) -> [B, out, H, W]``.

    Args:
        in_channels, out_channels: image channels in and out (``out_channels`` defaults to in).
        model_channels: width of the first level; the time embedding is 4x as wide.
        channel_mult: width multiplier per level; the image shrinks by 2 between levels.
        num_res_blocks: residual blocks per encoder level (the decoder has one more).
        attention_resolutions: feature-map sizes (e.g. ``(16,)``) that get self-attention.
        num_heads: attention heads, used when ``head_channels`` <= 0.
        head_channels: channels per head (then heads = channels / head_channels).
        dropout: dropout inside residual blocks.
        image_size: the training image size; only used to place attention by feature-map size.
        num_classes: number of classes for class conditioning (None: unconditional).
        context_dim: width D of context tokens for cross-attention (None: no text conditioning).
        use_scale_shift_norm: ADM-style ``norm(h) * (1 + scale) + shift`` conditioning. Use it for narrow
            nets: the DDPM default adds the embedding *before* a GroupNorm, which removes all of it where a
            group holds one channel and most of it where a group holds two.
        norm_groups: GroupNorm groups (fewer where the channel count is not a multiple).
    """

    kind = "unet"

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int | None = None,
        model_channels: int = 128,
        channel_mult: Sequence[int] = (1, 2, 2, 2),
        num_res_blocks: int = 2,
        attention_resolutions: Sequence[int] = (16,),
        num_heads: int = 1,
        head_channels: int = -1,
        dropout: float = 0.0,
        image_size: int = 32,
        num_classes: int | None = None,
        context_dim: int | None = None,
        use_scale_shift_norm: bool = False,
        norm_groups: int = 32,
    ) -> None:
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        self.config: dict[str, Any] = {
            "kind": self.kind, "in_channels": in_channels, "out_channels": out_channels, "model_channels": model_channels,
            "channel_mult": list(channel_mult), "num_res_blocks": num_res_blocks,
            "attention_resolutions": list(attention_resolutions), "num_heads": num_heads,
            "head_channels": head_channels, "dropout": dropout, "image_size": image_size, "num_classes": num_classes,
            "context_dim": context_dim, "use_scale_shift_norm": use_scale_shift_norm,
            "norm_groups": norm_groups,
        }  # fmt: skip
        self.num_classes = num_classes
        self.context_dim = context_dim
        self.num_levels = len(channel_mult)
        emb_dim = 4 * model_channels

        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
        )
        self.class_embed = nn.Embedding(num_classes + 1, emb_dim) if num_classes is not None else None
        self.null_context = nn.Parameter(torch.zeros(context_dim)) if context_dim is not None else None

        def res(c_in: int, c_out: int) -> ResBlock:
            return ResBlock(c_in, c_out, emb_dim, dropout, use_scale_shift_norm, norm_groups)

        def stage(c_in: int, c_out: int, size: int, resample: nn.Module | None = None) -> _Stage:
            attn = cross = None
            if size in attention_resolutions:
                heads = _heads(c_out, num_heads, head_channels)
                attn = SelfAttention(c_out, heads, norm_groups)
                cross = (
                    CrossAttention(c_out, context_dim, heads, norm_groups)
                    if context_dim is not None
                    else None
                )
            return _Stage(res(c_in, c_out), attn, cross, resample)

        self.stem = nn.Conv2d(in_channels, model_channels, 3, padding=1)
        self.down = nn.ModuleList()  # each entry adds one skip tensor
        skips, ch, size = [model_channels], model_channels, image_size
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                self.down.append(stage(ch, model_channels * mult, size))
                ch = model_channels * mult
                skips.append(ch)
            if level < self.num_levels - 1:
                self.down.append(Downsample(ch))
                skips.append(ch)
                size //= 2

        heads = _heads(ch, num_heads, head_channels)
        self.mid = nn.ModuleList([
            _Stage(
                res(ch, ch),
                SelfAttention(ch, heads, norm_groups),
                CrossAttention(ch, context_dim, heads, norm_groups) if context_dim is not None else None,
            ),
            _Stage(res(ch, ch)),
        ])  # fmt: skip

        self.up = nn.ModuleList()  # each entry consumes one skip tensor
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                c_out = model_channels * mult
                upsample = Upsample(c_out) if level > 0 and i == num_res_blocks else None
                self.up.append(stage(ch + skips.pop(), c_out, size, upsample))
                ch = c_out
            size *= 2

        self.out = nn.Sequential(  # Identity: the SiLU is fused into the norm; keeps the state-dict keys out.0/out.2
            group_norm(ch, norm_groups, act=True), nn.Identity(), zero_init(nn.Conv2d(ch, out_channels, 3, padding=1))
        )

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict from ``x`` [B, C, H, W] at network time ``t`` (float [B] or a scalar)."""
        b, _, h, w = x.shape
        factor = 2 ** (self.num_levels - 1)
        if h % factor or w % factor:
            raise ValueError(
                f"UNet: image size {h}x{w} is not divisible by {factor} ({self.num_levels} levels)"
            )
        x = match_layout(x, weight_layout(self.out[-1].weight))  # one-channel input: strides follow the net
        param = self.time_embed[0].weight
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(b)
        emb = self.time_embed(timestep_embedding(t, param.shape[1]).to(param.dtype))

        if class_labels is not None and self.class_embed is None:
            raise ValueError(
                "UNet: class_labels given but the network has no class conditioning (num_classes=None)"
            )
        if self.class_embed is not None:
            if class_labels is None:
                class_labels = torch.full((b,), self.num_classes, dtype=torch.long, device=x.device)
            emb = emb + self.class_embed(class_labels)
        emb_act = F.silu(emb)

        context, mask = self._context(b, context, context_mask)

        hs = [self.stem(x)]
        for block in self.down:
            hs.append(
                block(hs[-1]) if isinstance(block, Downsample) else block(hs[-1], emb_act, context, mask)
            )
        hcur = hs[-1]
        for block in self.mid:
            hcur = block(hcur, emb_act, context, mask)
        for block in self.up:
            hcur = block(torch.cat([hcur, hs.pop()], dim=1), emb_act, context, mask)
        return self.out(hcur).to(x.dtype)

    def _context(
        self, b: int, context: torch.Tensor | None, context_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Prepend the learned null token; return (context [B, 1+L, D], attention mask [B,1,1,1+L] | None)."""
        if self.null_context is None:
            if context is not None or context_mask is not None:
                raise ValueError(
                    "UNet: context given but the network has no cross-attention (context_dim=None)"
                )
            return None, None
        null = self.null_context.expand(b, 1, -1)
        if context is None:
            if context_mask is not None:
                raise ValueError("UNet: context_mask given without context")
            return null, None
        if context.shape[-1] != self.context_dim or context.dim() != 3:
            raise ValueError(f"UNet: context must be [B, L, {self.context_dim}], got {list(context.shape)}")
        context = torch.cat([null, context.to(null.dtype)], dim=1)
        if context_mask is None:
            return context, None
        keep = torch.ones(b, 1, dtype=torch.bool, device=context_mask.device)
        return context, torch.cat([keep, context_mask.bool()], dim=1)[:, None, None, :]
