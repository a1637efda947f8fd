"""Models in and out of other libraries (diffusers), behind difflab's interfaces.

- :mod:`~difflab.interop.folders`: a diffusers ``UNet2DModel`` folder (bare or a saved pipeline) as a
  difflab :class:`~difflab.denoiser.Denoiser`.
- :mod:`~difflab.interop.schedulers`: a diffusers scheduler config as difflab's grid of noise levels, the
  timesteps its UNet is given and the x0 clipping, so difflab's samplers draw what diffusers' loops draw.
- :mod:`~difflab.interop.export`: a difflab run as a diffusers pipeline folder (``difflab export``).

diffusers is optional and imported only when one of these is used.
"""

from difflab.interop.folders import (
    BETA_SCHEDULES,
    PREDICTION_TYPES,
    DiffusersUNet,
    diffusers_betas,
    diffusers_schedule,
    load_diffusers_unet,
)
from difflab.interop.schedulers import DiffusersDenoiser, SchedulerPlan, generate_like_diffusers, sample_folder, scheduler_plan

__all__ = ["BETA_SCHEDULES", "PREDICTION_TYPES", "DiffusersDenoiser", "DiffusersUNet", "SchedulerPlan",
           "diffusers_betas", "diffusers_schedule", "generate_like_diffusers", "load_diffusers_unet", "sample_folder",
           "scheduler_plan"]
