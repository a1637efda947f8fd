"""The noisy, time-conditioned classifier p(c | z_t, t) of classifier guidance (part 5).

``difflab.runs.classifier`` binds it to its process; ``difflab.methods.classification`` trains it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from difflab.errors import UsageError
from difflab.nets import register
from difflab.nets.layers import Downsample, ResBlock, group_norm, timestep_embedding


@register("noisy_classifier")
class NoisyClassifier(nn.Module):
    """A small time-conditioned ResNet, ``net(z_t, t) -> logits [B, num_classes]``.

    The UNet's encoder without attention: a 3x3 stem, ``len(channel_mult)`` levels of
    ``num_res_blocks`` residual blocks (ADM scale-shift time conditioning) separated by stride-2
    convolutions, then GroupNorm, SiLU, global average pooling and a linear head. ``t`` is the
    network time (discrete: the step index; continuous: 1000 t), as for the diffusion networks.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, model_channels: int = 32,
                 channel_mult: Sequence[int] = (1, 2, 2), num_res_blocks: int = 1, dropout: float = 0.0,
                 norm_groups: int = 32) -> None:
        super().__init__()
        if num_classes < 2:
            raise UsageError(f"a classifier needs at least 2 classes, got {num_classes}")
        self.config: dict[str, Any] = {
            "kind": "noisy_classifier", "in_channels": in_channels, "num_classes": num_classes,
            "model_channels": model_channels, "channel_mult": list(channel_mult),
            "num_res_blocks": num_res_blocks, "dropout": dropout, "norm_groups": norm_groups,
        }  # fmt: skip
        emb_dim = 4 * model_channels
        self.model_channels = model_channels
        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.stem = nn.Conv2d(in_channels, model_channels, 3, padding=1)
        self.blocks = nn.ModuleList()
        ch = model_channels
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                self.blocks.append(ResBlock(ch, model_channels * mult, emb_dim, dropout, True, norm_groups))
                ch = model_channels * mult
            if level < len(channel_mult) - 1:
                self.blocks.append(Downsample(ch))
        self.head = nn.Sequential(group_norm(ch, norm_groups), nn.SiLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(ch, num_classes))

    def forward(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Class logits [B, num_classes] of noisy images ``z`` [B, C, H, W] at network time ``t`` [B]."""
        t = torch.as_tensor(t, device=z.device).reshape(-1).expand(z.shape[0])
        param = self.time_embed[0].weight
        emb_act = F.silu(self.time_embed(timestep_embedding(t, self.model_channels).to(param.dtype)))
        h = self.stem(z)
        for block in self.blocks:
            h = block(h, emb_act) if isinstance(block, ResBlock) else block(h)
        return self.head(h)
