"""diffusers ``UNet2DModel`` folders as difflab denoisers.

:func:`load_diffusers_unet` reads a folder written by ``UNet2DModel.save_pretrained`` (``config.json``
+ ``diffusion_pytorch_model.safetensors`` or ``.bin``, with ``scheduler_config.json`` beside it when
present) or a saved pipeline (``model_index.json`` + ``unet/`` + ``scheduler/``), by path, with nothing
downloaded. The result is a :class:`~difflab.interop.schedulers.DiffusersDenoiser`: every difflab sampler,
the inversion and the likelihood run on it, and with a scheduler plan it samples what diffusers' loop does.

Time: diffusers indexes ``alphas_cumprod`` from 0 (timestep tau has alphabar = prod_{i <= tau} alpha_i);
difflab's step t = tau + 1 has the same gammabar_t^2 (t = 0 is the data), so the UNet gets tau = t - 1.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from difflab.errors import CheckpointError, UsageError
from difflab.interop.schedulers import DiffusersDenoiser, flow_process, is_flow
from difflab.processes.gaussian import DiscreteSchedule, cosine_schedule, register_schedule

PREDICTION_TYPES = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


def diffusers_betas(beta_schedule: str = "linear", T: int = 1000, beta_start: float = 1e-4,
                    beta_end: float = 0.02) -> torch.Tensor:
    """The float32 betas diffusers' DDPM/DDIM schedulers build for a ``beta_schedule``: linear in
    beta, linear in sqrt(beta) ("scaled_linear", latent diffusion), or the cosine schedule of
    Nichol & Dhariwal with betas capped at 0.999 ("squaredcos_cap_v2"; no 1000/T rescaling)."""
    if beta_schedule == "linear":
        return torch.linspace(beta_start, beta_end, T, dtype=torch.float32)
    if beta_schedule == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float32) ** 2
    if beta_schedule == "squaredcos_cap_v2":
        return cosine_schedule(T, 0.008, 0.999).beta(torch.arange(1, T + 1)).float()
    raise UsageError(f"unsupported diffusers beta_schedule '{beta_schedule}'; difflab reads "
                     f"{', '.join(BETA_SCHEDULES)} (or trained_betas)")


def diffusers_schedule(beta_schedule: str = "linear", T: int = 1000, beta_start: float = 1e-4,
                       beta_end: float = 0.02, trained_betas: list[float] | None = None) -> DiscreteSchedule:
    """The difflab schedule of a diffusers scheduler config, named "diffusers" with these arguments
    as its parameters. diffusers multiplies its alphas in float32; the per-step gammas are taken
    from that float32 table, so gammabar_t^2 equals diffusers' alphas_cumprod[t - 1] exactly."""
    betas = (torch.tensor(trained_betas, dtype=torch.float32) if trained_betas is not None
             else diffusers_betas(beta_schedule, T, beta_start, beta_end))
    abar = torch.cumprod(1.0 - betas, 0).double()
    if not bool((abar > 0).all()):
        raise UsageError("this schedule reaches alphabar = 0 (zero terminal SNR); difflab needs a finite "
                         "largest noise level")
    gammas = torch.sqrt(abar / torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]]))
    params = {"beta_schedule": beta_schedule, "T": len(betas), "beta_start": beta_start, "beta_end": beta_end}
    if trained_betas is not None:
        params["trained_betas"] = [float(b) for b in trained_betas]
    return DiscreteSchedule(gammas, "diffusers", params)


register_schedule("diffusers", diffusers_schedule)  # process configs naming it rebuild through make_schedule


class DiffusersUNet(nn.Module):
    """A diffusers ``UNet2DModel`` with difflab's network call ``net(z, t, class_labels=None, ...)``,
    t the difflab step (1..T), returning the output tensor (not diffusers' ``.sample`` wrapper)."""

    def __init__(self, unet: nn.Module, folder: str = "", time_offset: int = 1):
        super().__init__()
        self.unet, self.time_offset = unet, time_offset  # difflab's time minus diffusers' timestep
        self.channels = int(unet.config.in_channels)
        self.num_classes = int(unet.config.num_class_embeds or 0)
        self.config = {"kind": "diffusers", "folder": folder}

    def forward(self, z: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None = None,
                context: torch.Tensor | None = None, context_mask: torch.Tensor | None = None
                ) -> torch.Tensor:
        if context is not None:
            raise UsageError("a diffusers UNet2DModel takes no text condition")
        if class_labels is None and self.num_classes:
            raise UsageError(f"this UNet2DModel is class-conditional ({self.num_classes} classes): give --class")
        out = self.unet(z.to(self.unet.dtype), t - self.time_offset, class_labels=class_labels).sample
        # learned-variance models (improved-diffusion) stack the variance after the prediction
        return out[:, : self.channels].to(z.dtype)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {path} ({e})") from e


def load_diffusers_unet(folder: str | Path, device: str | torch.device = "cpu"
                        ) -> tuple[DiffusersDenoiser, tuple[int, int, int]]:
    """(denoiser, image shape (C, H, W)) of a diffusers ``UNet2DModel`` folder, with the schedule and
    prediction type of its ``scheduler_config.json`` (default: DDPM's linear betas 1e-4..0.02 over
    1000 steps, epsilon prediction)."""
    try:
        from diffusers import UNet2DModel
    except ImportError:
        raise UsageError("--diffusers-model needs: pip install diffusers") from None
    root = Path(folder)
    if not root.is_dir():
        raise UsageError(f"--diffusers-model {folder} is not a folder")
    unet_dir, sched_file = root, root / "scheduler_config.json"
    if not (root / "config.json").exists() and (root / "unet" / "config.json").exists():  # a saved pipeline
        unet_dir, sched_file = root / "unet", root / "scheduler" / "scheduler_config.json"
    if not (unet_dir / "config.json").exists():
        raise CheckpointError(f"{folder} has no config.json: write it with diffusers' "
                              "UNet2DModel.save_pretrained")
    kind = _read_json(unet_dir / "config.json").get("_class_name", "UNet2DModel")
    if kind != "UNet2DModel":
        raise UsageError(f"{unet_dir} holds a {kind}; --diffusers-model loads a pixel-space UNet2DModel")
    if not (unet_dir / "diffusion_pytorch_model.safetensors").is_file():
        # a .bin (or .ckpt) file is a pickle, which can run any code when loaded: never read it
        raise CheckpointError(f"{unet_dir} has no diffusion_pytorch_model.safetensors; difflab loads weights "
                              "only from safetensors (a .bin file is a pickle that can run code): convert it "
                              "in a trusted session with UNet2DModel.from_pretrained(...).save_pretrained(...)")
    try:
        unet = UNet2DModel.from_pretrained(unet_dir, low_cpu_mem_usage=False,  # no accelerate needed
                                           use_safetensors=True)
    except (OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"cannot load the UNet2DModel in {unet_dir} ({str(e).splitlines()[0]})") from e

    sched = _read_json(sched_file) if sched_file.exists() else {}
    if is_flow(sched):  # difflab's flow process, the velocity target, diffusers' timestep = difflab's time
        net = DiffusersUNet(unet, str(unet_dir), time_offset=0).to(device).eval().requires_grad_(False)
        return DiffusersDenoiser(net, flow_process(sched), "velocity", sched), _shape(unet)
    prediction_type = sched.get("prediction_type", "epsilon")
    if prediction_type not in PREDICTION_TYPES:
        raise UsageError(f"unsupported prediction_type '{prediction_type}' in {sched_file}; "
                         f"choose one of {', '.join(PREDICTION_TYPES)}")
    if sched.get("rescale_betas_zero_snr"):
        raise UsageError(f"{sched_file} asks for zero terminal SNR; difflab needs a finite largest "
                         "noise level")
    process = diffusers_schedule(sched.get("beta_schedule", "linear"),
                                 int(sched.get("num_train_timesteps", 1000)),
                                 float(sched.get("beta_start", 1e-4)), float(sched.get("beta_end", 0.02)),
                                 sched.get("trained_betas"))
    net = DiffusersUNet(unet, str(unet_dir)).to(device).eval().requires_grad_(False)
    return DiffusersDenoiser(net, process, PREDICTION_TYPES[prediction_type], sched), _shape(unet)


def _shape(unet) -> tuple[int, int, int]:
    """The image shape (C, H, W) a UNet2DModel draws."""
    size = unet.config.sample_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return int(unet.config.in_channels), int(h), int(w)
