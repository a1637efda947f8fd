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

from difflab.checks import check_range
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
    """A config file of a diffusers folder: a JSON object in a regular file (one line naming it otherwise)."""
    try:
        if not path.is_file():
            raise CheckpointError(f"{path} is not a regular file")
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CheckpointError(f"cannot read {path} ({e.__class__.__name__}: {str(e).splitlines()[0][:200]})") from e
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} is not a JSON object; a diffusers config is one")
    return config


MAX_SIDE, MAX_T = 4096, 100_000  # image sides and training steps a folder may claim
# the scheduler fields difflab or diffusers' scheduler classes read: (type, low, high); None is the default
# only where diffusers writes it (trained_betas)
SCHEDULER_FIELDS = {
    "num_train_timesteps": (int, 1, MAX_T), "beta_start": (float, 0, 1), "beta_end": (float, 0, 1),
    "beta_schedule": (str, BETA_SCHEDULES), "prediction_type": (str, tuple(PREDICTION_TYPES)),
    "trained_betas": (list, 0, 1), "clip_sample": (bool,), "clip_sample_range": (float, 0, 1e6),
    "thresholding": (bool,), "dynamic_thresholding_ratio": (float, 0, 1), "sample_max_value": (float, 0, 1e12),
    "timestep_spacing": (str, ("leading", "linspace", "trailing")), "steps_offset": (int, 0, MAX_T),
    "set_alpha_to_one": (bool,), "rescale_betas_zero_snr": (bool,), "use_karras_sigmas": (bool,),
    "variance_type": (str, ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned",
                            "learned_range")),
}
# the UNet fields that decide what is allocated, checked before the model is built
UNET_FIELDS = {"in_channels": (int, 1, 16), "out_channels": (int, 1, 32), "layers_per_block": (int, 1, 16),
               "norm_num_groups": (int, 1, 1024), "num_class_embeds": (int, 1, 1_000_000)}


def _check_field(path: Path, key: str, value, spec: tuple) -> None:
    """One config field against its (type, low, high) or (str, choices) or (bool,): one line naming the file."""
    kind, *bounds = spec
    where = f"{path}: '{key}'"
    if kind is bool and not isinstance(value, bool):
        raise CheckpointError(f"{where} must be true or false, got {value!r}")
    if kind is str and (not isinstance(value, str) or value not in bounds[0]):
        raise CheckpointError(f"{where} must be one of {', '.join(bounds[0])}, got {value!r}"[:300])
    if kind is list:
        if key == "trained_betas" and value is None:
            return
        if not isinstance(value, list) or not 1 <= len(value) <= MAX_T:
            raise CheckpointError(f"{where} must be a list of 1 to {MAX_T:,} numbers")
        for v in value:
            _check_number(where, v, float, 0, 1)
    if kind in (int, float):
        _check_number(where, value, kind, *bounds)


def _check_number(where: str, value, kind: type, lo: float, hi: float) -> None:
    """A whole number in [lo, hi], or a number in (lo, hi] ((0, 1) open at both ends: betas, ratios)."""
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise CheckpointError(f"{where} must be a whole number, got {value!r}"[:300])
    if kind is float and (isinstance(value, bool) or not isinstance(value, (int, float))):  # null, text, a list
        raise CheckpointError(f"{where} must be a number, got {value!r}"[:300])
    try:
        check_range(where, value, lo, hi, open_lo=kind is float, open_hi=kind is float and (lo, hi) == (0, 1))
    except UsageError as e:
        raise CheckpointError(str(e)[:300]) from None


def check_scheduler_config(path: Path, config: dict) -> None:
    """Every field of a scheduler config that difflab or diffusers reads, before anything is built."""
    for key, spec in SCHEDULER_FIELDS.items():
        if key in config:
            _check_field(path, key, config[key], spec)
    betas, steps = config.get("trained_betas"), config.get("num_train_timesteps", 1000)
    if betas is not None and len(betas) != steps:
        raise CheckpointError(f"{path}: 'trained_betas' lists {len(betas)} betas for num_train_timesteps {steps}")


def _sizes(value) -> list:
    return value if isinstance(value, list) else [value]


def check_unet_config(path: Path, config: dict) -> tuple[int, int, int]:
    """The fields of a UNet2DModel config that decide what is allocated (sizes, channels, blocks), before
    the model is built; returns the image shape (C, H, W)."""
    for key, spec in UNET_FIELDS.items():
        if key in config and not (key == "num_class_embeds" and config[key] is None):
            _check_field(path, key, config[key], spec)
    blocks = config.get("block_out_channels", [224, 448, 672, 896])  # (diffusers' default)
    types = [config.get(k, ["x"] * len(blocks) if isinstance(blocks, list) else None)
             for k in ("down_block_types", "up_block_types")]
    if not isinstance(blocks, list) or not 1 <= len(blocks) <= 8:
        raise CheckpointError(f"{path}: 'block_out_channels' must be a list of 1 to 8 channel counts")
    for ch in blocks:
        _check_number(f"{path}: 'block_out_channels'", ch, int, 1, 4096)
    for key, value in zip(("down_block_types", "up_block_types"), types):
        if not isinstance(value, list) or len(value) != len(blocks) or not all(isinstance(v, str) for v in value):
            raise CheckpointError(f"{path}: '{key}' must list one block name for each of the {len(blocks)} levels")
    size = config.get("sample_size", 32)
    sides = _sizes(size)
    if len(sides) != 2 and not isinstance(size, int):
        raise CheckpointError(f"{path}: 'sample_size' must be a side or [height, width], got {size!r}"[:300])
    for side in sides:
        _check_number(f"{path}: 'sample_size'", side, int, 1, MAX_SIDE)
        if side % 2 ** (len(blocks) - 1):
            raise CheckpointError(f"{path}: 'sample_size' {size} is not divisible by 2^{len(blocks) - 1} (the UNet "
                                  f"halves it {len(blocks) - 1} times)")
    h, w = sides * 2 if len(sides) == 1 else sides
    return int(config.get("in_channels", 3)), int(h), int(w)


def _check_weights(unet_dir: Path, cls, config: dict) -> None:
    """The model the config describes, built without memory (torch's meta device), must have the tensors of
    the weights file, name for name and shape for shape: then building it allocates only what the file holds."""
    from safetensors import safe_open

    weights = unet_dir / "diffusion_pytorch_model.safetensors"
    try:
        with safe_open(str(weights), framework="pt") as f:
            held = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
        with torch.device("meta"):
            model = cls.from_config(config)
    except Exception as e:  # safetensors' and diffusers' own error types for what they cannot read
        raise CheckpointError(f"cannot load the UNet2DModel in {unet_dir} ({str(e).splitlines()[0][:200] if str(e) else e!r})") from e
    wanted = {k: list(v.shape) for k, v in model.state_dict().items()}
    if held != wanted:
        diff = sorted(set(held) ^ set(wanted)) or [k for k in wanted if held[k] != wanted[k]]
        raise CheckpointError(f"{weights} does not hold the tensors its config.json describes (first: {diff[0]})")


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
    unet_config = _read_json(unet_dir / "config.json")
    kind = unet_config.get("_class_name", "UNet2DModel")
    if kind != "UNet2DModel":
        raise UsageError(f"{unet_dir} holds a {str(kind)[:100]}; --diffusers-model loads a pixel-space UNet2DModel")
    if not (unet_dir / "diffusion_pytorch_model.safetensors").is_file():
        # a .bin (or .ckpt) file is a pickle, which can run any code when loaded: never read it
        raise CheckpointError(f"{unet_dir} has no diffusion_pytorch_model.safetensors; difflab loads weights "
                              "only from safetensors (a .bin file is a pickle that can run code): convert it "
                              "in a trusted session with UNet2DModel.from_pretrained(...).save_pretrained(...)")
    shape = check_unet_config(unet_dir / "config.json", unet_config)
    sched = _read_json(sched_file) if sched_file.exists() else {}
    check_scheduler_config(sched_file, sched)
    if sched.get("rescale_betas_zero_snr"):
        raise UsageError(f"{sched_file} asks for zero terminal SNR; difflab needs a finite largest "
                         "noise level")
    _check_weights(unet_dir, UNet2DModel, unet_config)
    try:
        unet = UNet2DModel.from_pretrained(unet_dir, low_cpu_mem_usage=False,  # no accelerate needed
                                           use_safetensors=True)
    except Exception as e:  # diffusers' and safetensors' own error types
        raise CheckpointError(f"cannot load the UNet2DModel in {unet_dir} ({str(e).splitlines()[0][:200] if str(e) else e!r})") from e
    if is_flow(sched):  # difflab's flow process, the velocity target, diffusers' timestep = difflab's time
        net = DiffusersUNet(unet, str(unet_dir), time_offset=0).to(device).eval().requires_grad_(False)
        return DiffusersDenoiser(net, flow_process(sched), "velocity", sched), shape
    process = diffusers_schedule(sched.get("beta_schedule", "linear"), sched.get("num_train_timesteps", 1000),
                                 sched.get("beta_start", 1e-4), sched.get("beta_end", 0.02), sched.get("trained_betas"))
    net = DiffusersUNet(unet, str(unet_dir)).to(device).eval().requires_grad_(False)
    return DiffusersDenoiser(net, process, PREDICTION_TYPES[sched.get("prediction_type", "epsilon")], sched), shape
