"""A diffusers ``UNet2DModel`` folder as a model that takes a :class:`~difflab.runs.request.SampleRequest`, beside
:class:`difflab.runs.draw.Run` (``difflab sample --diffusers-model``, ``difflab.load``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from difflab.figures import to_uint8
from difflab.interop.folders import load_diffusers_unet
from difflab.interop.schedulers import DiffusersDenoiser, SchedulerPlan, sample_folder
from difflab.runs.request import ModelTraits, SampleRequest

FOLDER_DEFAULTS = {"sampler": "ddim", "steps": 50}  # what a folder samples with unless told


@dataclass
class FolderModel:
    """A diffusers folder's denoiser and image shape; samples follow its scheduler config (grid, timesteps,
    clipping) unless a difflab ``spacing`` is asked for."""

    path: Path
    denoiser: DiffusersDenoiser
    shape: tuple[int, int, int]
    device: torch.device
    per_sample_seeds: ClassVar[bool] = True
    step: ClassVar[int] = 0  # (a folder has no training step)

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> FolderModel:
        den, shape = load_diffusers_unet(path, device)
        return cls(Path(path), den, tuple(shape), torch.device(device))

    @property
    def net(self) -> torch.nn.Module:
        """The UNet with difflab's network call."""
        return self.denoiser.net

    @property
    def num_classes(self) -> int:
        return int(getattr(self.denoiser.net, "num_classes", 0) or 0)

    def ode_denoiser(self, net: torch.nn.Module | None = None) -> DiffusersDenoiser:
        """D(x, sigma) for deterministic DDIM work (inversion, interpolation): the UNet on plain timesteps (no
        scheduler plan), calling ``net`` (a wrapper of it) if given."""
        return self.denoiser.planned(None, net)

    @property
    def class_names(self) -> None:
        return None  # a UNet2DModel folder names no classes

    def traits(self) -> ModelTraits:
        """A class-conditional UNet2DModel takes labels but has no null class (no guidance)."""
        k = self.num_classes
        return ModelTraits("gaussian", True, "class" if k else "none", k, self.shape, dict(FOLDER_DEFAULTS),
                           guidable=False, classifier_guidance=False)

    def prepare(self, request: SampleRequest) -> SampleRequest:
        return request.resolve(self.traits())

    def plan(self, request: SampleRequest) -> SchedulerPlan | None:
        """The scheduler's plan for a prepared request's sampler and steps; None when it asks for a difflab
        ``spacing`` (difflab's grid, the UNet's plain timesteps, no scheduler clipping)."""
        return None if request.spacing is not None else self.denoiser.plan_for(request.sampler, request.steps)

    def draw(self, request: SampleRequest, *, plan: SchedulerPlan | None = None, progress=None, callback=None,
             net=None) -> torch.Tensor:
        """The samples of a prepared request as uint8 [n, C, H, W], on ``plan``'s grid (:meth:`plan`);
        ``net``: a wrapper of the UNet to call instead."""
        den = self.denoiser if net is None else self.denoiser.planned(None, net)
        x = sample_folder(den, request.n, self.shape, seed=request.seed, sampler=request.sampler,
                          steps=request.steps, batch_size=request.batch_size, device=self.device,
                          start=request.start, init_noise=request.init_noise, label=request.label_tensor(),
                          progress=progress, callback=callback, plan=plan, **request.options())
        return to_uint8(x)
