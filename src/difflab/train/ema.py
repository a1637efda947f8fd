"""Exponential moving average of the weights, with warm-up: the decay at update n is
min(decay, (1 + n) / (10 + n)), so early averages are not dominated by the random init."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """A frozen copy of a model whose floating-point weights follow the model's."""

    def __init__(self, model: nn.Module, decay: float = 0.999):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.updates = 0

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = self.current_decay()
        src = [p for p in model.state_dict().values() if p.is_floating_point()]
        dst = [p for p in self.model.state_dict().values() if p.is_floating_point()]
        torch._foreach_lerp_(dst, src, 1 - d)
        self.updates += 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def load_state_dict(self, sd: dict[str, torch.Tensor], updates: int) -> None:
        self.model.load_state_dict(sd)
        self.updates = updates
