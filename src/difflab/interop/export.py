"""A difflab run as a diffusers pipeline folder: ``difflab export --run DIR --to diffusers OUT``.

The folder is what ``huggingface_hub.upload_folder`` publishes and what ``DDPMPipeline.from_pretrained``
/ ``DDIMPipeline.from_pretrained`` load: ``model_index.json``, ``unet/`` (``UNet2DModel``, safetensors),
``scheduler/`` (``DDPMScheduler``), a ``README.md`` model card with the Hub's YAML metadata (the data set's
name, never a local path, and its license), and ``samples.png``, drawn by the card's own snippet. The weights
are the EMA weights unless asked otherwise. :func:`save_model` is ``Model.save_pretrained``: this folder or a
clean copy of the run folder.

Exact mapping, nothing approximated: the UNet is the architecture's diffusers twin
(:func:`difflab.nets.presets.twin_kwargs`) with the same tensors under diffusers' names. diffusers gives
the UNet timestep tau = t - 1 for difflab's step t (the same alphabar), so the time embedding's first
layer is composed with the rotation that turns the sinusoid of tau into the sinusoid of tau + 1
(sin(w(tau + 1)) = sin(w tau) cos w + cos(w tau) sin w, and so on): the twin at tau is difflab's net at t.
The scheduler config names the run's schedule when diffusers has it (linear over T = 1000, cosine) and
lists its betas (``trained_betas``) otherwise; ``timestep_spacing="trailing"`` with ``set_alpha_to_one``
is difflab's uniform grid; the run's ``--clip`` becomes ``clip_sample`` (or dynamic ``thresholding``
with no upper bound, as difflab's), and DDIM then needs ``use_clipped_model_output=True`` (the model card
says so) to renoise with the noise of the clipped x0 as difflab does.

A run of the flow process with the velocity target exports with its twin, ``FlowMatchEulerDiscreteScheduler``
(shift 1, 1000 training timesteps): diffusers gives the UNet the timestep 1000 t, difflab's own network time,
so no shift of the time embedding; its Euler loop from t = 1 down to t_min = 1e-3 is difflab's Euler on the
uniform grid, and it never clips x0 (difflab's ``--clip none``). ``DDPMPipeline`` runs that loop.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch

from difflab.errors import UsageError

PIPELINE_PREDICTION = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}


def _refuse(why: str) -> None:
    raise UsageError(f"cannot export this run to diffusers: {why}")


def check_exportable(run) -> None:
    """One clear UsageError naming why diffusers cannot represent the run, if it cannot."""
    cfg = run.cfg
    if not run.method.denoises:
        _refuse(f"method '{cfg.method}' is not Gaussian diffusion (diffusers pipelines only sample those)")
    if run.net.config.get("kind") != "unet":
        _refuse(f"its network is a {run.net.config.get('kind')} (CoordConv inputs have no UNet2DModel layer)")
    process = run.denoiser().process
    if cfg.process == "flow":
        if cfg.prediction != "velocity":
            _refuse(f"diffusers' flow-matching scheduler takes the velocity, not prediction '{cfg.prediction}'")
        if process.t_min != 1e-3:
            _refuse(f"its flow process ends at t_min = {process.t_min:g}; diffusers' flow-matching grid ends at 1e-3")
    elif not getattr(process, "discrete", False):
        _refuse("its process is continuous-time (diffusers' DDPM/DDIM schedulers have discrete steps)")
    elif cfg.prediction not in PIPELINE_PREDICTION:
        _refuse(f"prediction '{cfg.prediction}' has no diffusers prediction_type (epsilon, v_prediction, "
                "sample); EDM preconditioning and z_{t-1} prediction are difflab's own")
    if cfg.conditioning == "text":
        _refuse("text conditioning uses difflab's cross-attention UNet and prompt encoder, which "
                "UNet2DModel does not have")


def _time_shift(weight: torch.Tensor) -> torch.Tensor:
    """The first time-embedding layer's weight composed with the sinusoid's shift by one step."""
    dim = weight.shape[1]
    half = dim // 2
    exponent = torch.arange(half, dtype=torch.float64) / max(half - 1, 1)
    w = torch.exp(-math.log(10000.0) * exponent)
    c, s = torch.cos(w), torch.sin(w)
    shift = torch.zeros(dim, dim, dtype=torch.float64)  # features f = [sin, cos]: f(tau + 1) = shift @ f(tau)
    i = torch.arange(half)
    shift[i, i], shift[i, i + half] = c, s
    shift[i + half, i + half], shift[i + half, i] = c, -s
    if dim % 2:
        shift[-1, -1] = 1.0  # the zero padding column
    return (weight.double() @ shift).to(weight.dtype)


def diffusers_state_dict(net, time_shift: bool = True) -> dict[str, torch.Tensor]:
    """The tensors of a difflab ``UNet`` under its UNet2DModel twin's names (the same layers); ``time_shift``:
    composed with the shift of diffusers' discrete timestep tau to difflab's step tau + 1."""
    sd: dict[str, torch.Tensor] = {}

    def put(name, module):
        sd[f"{name}.weight"], sd[f"{name}.bias"] = module.weight, module.bias

    def res(name, block):
        for theirs, ours in [("norm1", "norm1"), ("conv1", "conv1"), ("time_emb_proj", "emb_proj"),
                             ("norm2", "norm2"), ("conv2", "conv2"), ("conv_shortcut", "skip")]:  # fmt: skip
            if isinstance(getattr(block, ours), torch.nn.Conv2d | torch.nn.Linear | torch.nn.GroupNorm):
                put(f"{name}.{theirs}", getattr(block, ours))

    def attn(name, block):
        put(f"{name}.group_norm", block.norm)
        put(f"{name}.to_out.0", block.proj)
        for i, (w, b) in enumerate(zip(block.qkv.weight.chunk(3), block.qkv.bias.chunk(3))):
            sd[f"{name}.to_{'qkv'[i]}.weight"], sd[f"{name}.to_{'qkv'[i]}.bias"] = w, b

    put("conv_in", net.stem)
    put("time_embedding.linear_1", net.time_embed[0])
    put("time_embedding.linear_2", net.time_embed[2])
    if net.class_embed is not None:
        sd["class_embedding.weight"] = net.class_embed.weight
    levels, blocks = len(net.config["channel_mult"]), net.config["num_res_blocks"]
    down, up = iter(net.down), iter(net.up)
    for level in range(levels):
        for j in range(blocks):
            stage = next(down)
            res(f"down_blocks.{level}.resnets.{j}", stage.res)
            if stage.attn is not None:
                attn(f"down_blocks.{level}.attentions.{j}", stage.attn)
        if level < levels - 1:
            put(f"down_blocks.{level}.downsamplers.0.conv", next(down).conv)
        for j in range(blocks + 1):
            stage = next(up)
            res(f"up_blocks.{level}.resnets.{j}", stage.res)
            if stage.attn is not None:
                attn(f"up_blocks.{level}.attentions.{j}", stage.attn)
            if stage.resample is not None:
                put(f"up_blocks.{level}.upsamplers.0.conv", stage.resample.conv)
    res("mid_block.resnets.0", net.mid[0].res)
    attn("mid_block.attentions.0", net.mid[0].attn)
    res("mid_block.resnets.1", net.mid[1].res)
    put("conv_norm_out", net.out[0])
    put("conv_out", net.out[2])
    sd = {k: v.detach().float().cpu().contiguous().clone() for k, v in sd.items()}
    if time_shift:
        sd["time_embedding.linear_1.weight"] = _time_shift(sd["time_embedding.linear_1.weight"])
    return sd


def scheduler_config(process, prediction: str, clip: str = "none") -> dict:
    """DDPMScheduler arguments for a discrete difflab schedule, parameterisation and x0 clipping."""
    params = getattr(process, "params", {})
    cfg = {"num_train_timesteps": process.T, "prediction_type": PIPELINE_PREDICTION[prediction],
           "clip_sample": clip == "clip", "clip_sample_range": 1.0, "thresholding": clip == "dynamic",
           "dynamic_thresholding_ratio": 0.995, "sample_max_value": 1e9,
           "timestep_spacing": "trailing", "steps_offset": 0, "variance_type": "fixed_small"}
    if process.name == "linear" and process.T == 1000:
        cfg.update(beta_schedule="linear", beta_start=params["beta_start"], beta_end=params["beta_end"])
    elif process.name == "cosine" and params.get("offset", 0.008) == 0.008:
        cfg.update(beta_schedule="squaredcos_cap_v2")
    else:
        betas = process.beta(torch.arange(1, process.T + 1))
        cfg.update(trained_betas=[float(b) for b in betas])
    return cfg


def flow_scheduler_config() -> dict:
    """FlowMatchEulerDiscreteScheduler arguments of difflab's flow process (shift 1, 1000 timesteps)."""
    return {"num_train_timesteps": 1000, "shift": 1.0, "use_dynamic_shifting": False}


SEED = 0  # the generator seed of the model card's snippet, which draws its samples.png
LICENSE = re.compile(r"[a-z0-9][a-z0-9.+-]{0,63}")  # a Hub license id: mit, cc-by-4.0, apache-2.0, other, ...


def data_card(data: str) -> tuple[str | None, str]:
    """The name a run's ``--data`` goes by in public (a built-in set's key, a folder's own name, never its path;
    None for images given in memory) and the data's license (``unknown`` where difflab does not know it)."""
    from difflab.data import LICENSES, dataset_key
    from difflab.data.memory import PREFIX

    key = dataset_key(data)
    if key:
        return key, LICENSES.get(key, "unknown")
    if data.startswith(PREFIX):
        return None, "unknown"
    return Path(data).expanduser().resolve().name or "data", "unknown"


def check_license(license: str | None) -> str | None:
    """``--license``: a Hub license id, or None (the data's own, where known)."""
    if license is not None and not (isinstance(license, str) and LICENSE.fullmatch(license)):
        raise UsageError(f"--license must be a license id such as mit, cc-by-4.0, apache-2.0 or other, got {license!r}"[:200])
    return license


def snippet(run, n: int) -> tuple[str, dict, torch.Tensor | None, list[str]]:
    """(the pipeline class, its call's settings, the class labels its UNet is given (class-conditional runs;
    diffusers' pipelines pass none), the card's Python lines) that draw ``n`` samples of the exported folder in
    the run's number of sampling steps; the card's samples.png is that call's output."""
    note, steps = "", run.cfg.sample_steps
    if run.cfg.process == "flow":  # the flow-matching scheduler's Euler loop, which never clips x0
        pipeline, call = "DDPMPipeline", {"batch_size": n, "num_inference_steps": steps}
        note = "  # with its FlowMatchEulerDiscreteScheduler"
    else:
        pipeline, call = "DDIMPipeline", {"batch_size": n, "num_inference_steps": steps, "eta": 0.0}
        if run.cfg.clip != "none":
            call["use_clipped_model_output"] = True
    args = ", ".join(f"{k}={v!r}" for k, v in call.items())
    lines = ["import torch", f"from diffusers import {pipeline}", f"pipe = {pipeline}.from_pretrained(\"PATH_OR_REPO\"){note}"]
    labels, k = None, run.conditioner.num_classes if run.conditioner.kind == "class" else 0
    if k:
        labels = torch.arange(n) % k
        lines += [f"labels = torch.arange({n}) % {k}  # image i of class i mod {k} (label {k}: the null class)",
                  "unet = pipe.unet.forward",
                  "pipe.unet.forward = lambda x, t, **kw: unet(x, t, class_labels=labels, **kw)"]
    lines += [f"images = pipe({args}, generator=torch.Generator().manual_seed({SEED})).images"]
    return pipeline, call, labels, lines


def model_card(run, pipeline: str, sample_file: str, lines: list[str], license: str | None = None) -> str:
    """README.md with the Hub's YAML metadata for the exported folder: the data set's name and license,
    ``sample_file`` (what the snippet ``lines`` draw) and the training settings (no local path)."""
    cfg = run.cfg
    name, known = data_card(cfg.data)
    license = license or known
    what = f"`{name}`" if name else f"images given in memory (fingerprint {cfg.data.split(':')[-1]})"
    meta = ["---", "library_name: diffusers", "pipeline_tag: unconditional-image-generation", f"license: {license}",
            "tags:", "- difflab", "- diffusion", f"- {pipeline}", *([f"datasets:\n- {name}"] if name else []),
            "model-index:", f"- name: {Path(run.path).name}", "---"]
    h = run.shape
    schedule = "rectified-flow process" if cfg.process == "flow" else f"{cfg.process} schedule over T = {cfg.T} steps"
    text = [f"# {Path(run.path).name}", "",
            f"A {h[1]}x{h[2]}x{h[0]} image diffusion model trained with difflab on {what} for "
            f"{run.step} steps (batch {cfg.batch_size}, lr {cfg.lr}); the EMA weights, {schedule}, "
            f"{cfg.prediction} prediction.", ""]
    if license == "unknown":
        text += ["The license of the training data is not known to difflab: set `license:` above to it before "
                 "publishing (`difflab export --license ID`).", ""]
    text += [f"![samples]({sample_file})", "", f"`{sample_file}` is what this code draws:", "", "```python", *lines,
             "```", ""]
    if run.conditioner.kind == "class":
        text += [f"Class-conditional ({run.conditioner.num_classes} classes, label "
                 f"{run.conditioner.num_classes} is the null class): the UNet takes `class_labels`, which "
                 "diffusers' unconditional pipelines do not pass; the code above gives them.", ""]
    settings = {**cfg.to_json(), "data": name or cfg.data, "out": Path(run.path).name}
    text += ["Training settings (difflab's `config.json`):", "", "```json",
             json.dumps(settings, indent=2, default=str), "```", ""]
    return "\n".join(meta + [""] + text)


def export_diffusers(run_dir: str | Path, out: str | Path, ema: bool = True, n_samples: int = 16,
                     license: str | None = None) -> Path:
    """Write the run as a diffusers pipeline folder at ``out`` (new, or an empty folder; never inside a run
    folder), atomically: the folder is written beside ``out`` and renamed into place when complete. ``license``:
    the model card's (default: the data set's, where difflab knows it, else ``unknown``)."""
    from difflab.files import check_output_folder
    from difflab.runs.draw import load_run

    check_license(license)
    check_output_folder(out, "--to diffusers")
    return write_diffusers(load_run(run_dir, "cpu", ema=ema), out, "--to diffusers", n_samples, license)


def write_diffusers(run, out: str | Path, flag: str, n_samples: int = 16, license: str | None = None) -> Path:
    """Write loaded run ``run`` (its weights as loaded) as a diffusers pipeline folder at ``out``, atomically;
    ``flag`` names ``out`` in errors; the model card's samples.png is drawn by its own snippet."""
    from difflab.files import atomic_folder

    check_license(license)
    check_exportable(run)
    try:
        import diffusers
    except ImportError:
        raise UsageError("export to diffusers needs: pip install diffusers") from None
    from difflab.nets.presets import twin_kwargs

    try:
        kwargs = twin_kwargs(run.net.config, "its network")
    except ValueError as e:
        _refuse(str(e))
    unet = diffusers.UNet2DModel(**kwargs)
    flow = run.cfg.process == "flow"
    unet.load_state_dict(diffusers_state_dict(run.net, time_shift=not flow), strict=True)
    if flow:
        sched = diffusers.FlowMatchEulerDiscreteScheduler(**flow_scheduler_config())
    else:
        sched = diffusers.DDPMScheduler(**scheduler_config(run.denoiser().process, run.cfg.prediction, run.cfg.clip))
    pipeline, call, labels, lines = snippet(run, n_samples)

    def fill(folder: Path) -> None:
        diffusers.DDPMPipeline(unet=unet, scheduler=sched).save_pretrained(folder, safe_serialization=True)
        pipe = getattr(diffusers, pipeline)(unet=unet, scheduler=sched)  # what the snippet loads (a test checks)
        pipe.set_progress_bar_config(disable=True)
        if labels is not None:
            forward = pipe.unet.forward
            pipe.unet.forward = lambda x, t, **kw: forward(x, t, class_labels=labels, **kw)
        images = pipe(**call, generator=torch.Generator().manual_seed(SEED)).images
        save_snippet_grid(images, folder / "samples.png")
        (folder / "README.md").write_text(model_card(run, "ddpm", "samples.png", lines, license))

    return atomic_folder(out, fill, flag)


def save_snippet_grid(images: list, path: Path) -> Path:
    """The PIL images a pipeline returns as one PNG grid, as difflab saves its samples."""
    import numpy as np

    from difflab.figures import save_grid

    arrays = [np.asarray(im, dtype=np.uint8) for im in images]
    stacked = torch.from_numpy(np.stack([a[:, :, None] if a.ndim == 2 else a for a in arrays])).permute(0, 3, 1, 2)
    return save_grid(stacked, path)


# what a run folder's copy holds besides its config, checkpoint and samples: what sampling reads (the grid
# bottom, a text run's prompts) and the training log
RUN_FILES = ("grid-bottom.json", "prompts.safetensors", "loss.csv", "loss.png")


def write_run(run, out: str | Path, flag: str) -> Path:
    """A clean copy of loaded run ``run``'s folder at ``out`` (new or empty), atomically: its config, the
    checkpoint its weights come from, its samples and :data:`RUN_FILES`; no older checkpoint, snapshot or lock.
    Refused when the weights are not that checkpoint's (a post-hoc EMA, bf16, edited)."""
    import shutil

    from difflab.files import atomic_folder
    from difflab.nets import split_prefix
    from difflab.runs.checkpoint import load_checkpoint

    src = Path(run.path)
    stem = f"step-{run.step:07d}"
    ckpt = src / "checkpoints" / f"{stem}.json"
    tensors = load_checkpoint(ckpt)[0] if ckpt.is_file() else {}
    weights = run.net.state_dict()
    if not any(_same(split_prefix(tensors, part), weights) for part in ("ema", "model")):
        raise UsageError(f"this model's weights are not those of {ckpt} (a post-hoc EMA, bf16 or edited weights): "
                         "format='run' copies checkpoints; save it with format='diffusers'")

    def fill(folder: Path) -> None:
        (folder / "checkpoints").mkdir()
        for name in (f"{stem}.json", f"{stem}.safetensors"):
            shutil.copyfile(src / "checkpoints" / name, folder / "checkpoints" / name)
        for name in ("config.json", *RUN_FILES):
            if (src / name).is_file():
                shutil.copyfile(src / name, folder / name)
        if (src / "samples").is_dir():
            shutil.copytree(src / "samples", folder / "samples")

    return atomic_folder(out, fill, flag)


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k].cpu(), b[k].cpu()) for k in a)


FORMATS = ("run", "diffusers")


def save_model(source, out: str | Path, format: str, license: str | None = None) -> Path:
    """``Model.save_pretrained``: a loaded run (a :class:`~difflab.runs.draw.Run`) or diffusers folder written to
    a new folder ``out`` in ``format`` ("run": :func:`write_run`; "diffusers": :func:`write_diffusers` with the
    model card's ``license``, a diffusers folder copied as it is)."""
    import shutil

    from difflab.files import atomic_folder, check_output_folder

    flag = "save_pretrained"
    if format not in FORMATS:
        raise UsageError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    if license is not None and (format == "run" or getattr(source, "cfg", None) is None):
        raise UsageError("license is written in the model card of an export: it needs a run saved with "
                         "format='diffusers'")
    check_license(license)
    check_output_folder(out, flag)
    if getattr(source, "cfg", None) is not None:  # a difflab run
        return write_run(source, out, flag) if format == "run" else write_diffusers(source, out, flag, license=license)
    if format == "run":
        raise UsageError(f"{source.path} is a diffusers folder, not a difflab run: save it with format='diffusers'")
    return atomic_folder(out, lambda folder: shutil.copytree(source.path, folder, dirs_exist_ok=True), flag)
