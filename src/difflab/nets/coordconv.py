"""The series' network (SPEC part 1): a small UNet that sees time and position before every convolution.

Every convolution (1x1 and 3x3, including the resamplers) gets three extra input channels at its own
resolution: the time ``t / time_scale`` as a constant plane, and the pixel coordinates (row, column),
each in [0, 1] (the CoordConv idea). There is no sinusoidal embedding and no attention; that is what
``UNet`` is for.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .layers import group_norm, zero_init

Aux = Callable[[torch.Tensor], torch.Tensor]  # feature map [B, C, H, W] -> extra channels [B, 3, H, W]


class CoordConv2d(nn.Conv2d):
    """A convolution whose input is ``cat([x, t plane, row plane, column plane])``."""

    EXTRA = 3

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1) -> None:
        super().__init__(
            in_channels + self.EXTRA, out_channels, kernel_size, stride, padding=kernel_size // 2
        )

    def forward(self, x: torch.Tensor, aux: Aux) -> torch.Tensor:  # type: ignore[override]
        return super().forward(torch.cat([x, aux(x)], dim=1))


class CoordResBlock(nn.Module):
    """GroupNorm, SiLU, 3x3 coord-conv, GroupNorm, SiLU, dropout, 3x3 coord-conv (zero-init) + shortcut."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = group_norm(in_channels, act=True)
        self.conv1 = CoordConv2d(in_channels, out_channels, 3)
        self.norm2 = group_norm(out_channels, act=True)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_init(CoordConv2d(out_channels, out_channels, 3))
        self.skip = CoordConv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor, aux: Aux) -> torch.Tensor:
        h = self.conv1(self.norm1(x), aux)
        h = self.conv2(self.dropout(self.norm2(h)), aux)
        return (x if self.skip is None else self.skip(x, aux)) + h


class CoordConvUNet(nn.Module):
    """The series' UNet, ``net(x, t) -> [B, out_channels, H, W]``; takes no conditions.

    Args:
        in_channels, out_channels: image channels in and out (``out_channels`` defaults to in).
        channels: width per level; the image halves between levels. The series uses (8, 16, 24) for
            algorithm 1 and (16, 32, 64) for algorithm 2.
        num_res_blocks: residual blocks per level on each side.
        time_scale: the network sees ``t / time_scale``; set it to the number of steps T so the time
            channel lies in [0, 1].
        dropout: dropout inside residual blocks.
    """

    kind = "coordconv_unet"

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int | None = None,
        channels: Sequence[int] = (16, 32, 64),
        num_res_blocks: int = 1,
        time_scale: float = 1000.0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        self.config: dict[str, Any] = {
            "kind": self.kind, "in_channels": in_channels, "out_channels": out_channels, "channels": list(channels),
            "num_res_blocks": num_res_blocks, "time_scale": time_scale, "dropout": dropout,
        }  # fmt: skip
        self.time_scale = float(time_scale)
        self.num_levels = len(channels)

        self.stem = CoordConv2d(in_channels, channels[0], 1)
        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        ch = channels[0]
        for level, c in enumerate(channels):
            self.down.append(nn.ModuleList())
            for _ in range(num_res_blocks):
                self.down[-1].append(CoordResBlock(ch, c, dropout))
                ch = c
            if level < self.num_levels - 1:
                self.downsample.append(CoordConv2d(ch, ch, 3, stride=2))
        self.mid = CoordResBlock(ch, ch, dropout)
        self.up = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for level in reversed(range(self.num_levels)):
            c = channels[level]
            self.up.append(nn.ModuleList())
            for i in range(num_res_blocks):
                self.up[-1].append(CoordResBlock(ch + (c if i == 0 else 0), c, dropout))
                ch = c
            if level > 0:
                self.upsample.append(CoordConv2d(ch, ch, 3))
        self.out_norm = group_norm(ch, act=True)
        self.out_conv = zero_init(CoordConv2d(ch, out_channels, 1))

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict from ``x`` [B, C, H, W] at network time ``t`` (float [B] or a scalar)."""
        if class_labels is not None or context is not None or context_mask is not None:
            raise ValueError("CoordConvUNet takes no conditions: pass class_labels=None and context=None")
        b, _, h, w = x.shape
        factor = 2 ** (self.num_levels - 1)
        if h % factor or w % factor:
            raise ValueError(f"CoordConvUNet: image size {h}x{w} is not divisible by {factor}")
        time = torch.as_tensor(t, device=x.device).reshape(-1).expand(b).float() / self.time_scale
        planes: dict[tuple[int, int, torch.dtype, bool], torch.Tensor] = {}

        def aux(feat: torch.Tensor) -> torch.Tensor:
            hw = (feat.shape[2], feat.shape[3])
            key = (*hw, feat.dtype, _is_channels_last(feat))
            if key not in planes:
                rows = torch.linspace(0, 1, hw[0], device=x.device)[None, None, :, None]
                cols = torch.linspace(0, 1, hw[1], device=x.device)[None, None, None, :]
                extra = torch.cat([
                    time[:, None, None, None].expand(b, 1, *hw), rows.expand(b, 1, *hw), cols.expand(b, 1, *hw)
                ], dim=1).to(feat.dtype)  # fmt: skip
                planes[key] = extra.contiguous(memory_format=torch.channels_last) if key[3] else extra
            return planes[key]

        hcur = self.stem(x, aux)
        skips = []
        for level, blocks in enumerate(self.down):
            for block in blocks:
                hcur = block(hcur, aux)
            skips.append(hcur)
            if level < self.num_levels - 1:
                hcur = self.downsample[level](hcur, aux)
        hcur = self.mid(hcur, aux)
        for i, blocks in enumerate(self.up):
            hcur = torch.cat([hcur, skips.pop()], dim=1)
            for block in blocks:
                hcur = block(hcur, aux)
            if i < self.num_levels - 1:
                hcur = self.upsample[i](F.interpolate(hcur, scale_factor=2.0, mode="nearest"), aux)
        return self.out_conv(self.out_norm(hcur), aux).to(x.dtype)


def _is_channels_last(x: torch.Tensor) -> bool:
    return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
