"""Training throughput: difflab's real training step against diffusers' UNet2DModel of the same
architecture, in the same process, on the same data and batch.

Both sides do the same work per step: noise + timestep draw, forward, MSE on the noise,
backward, gradient clipping at 1.0, AdamW (fused on GPUs) and an EMA update.
difflab runs its own Trainer.train_step (per-sample seeded noise, data resident on the device);
diffusers runs the loop of its train_unconditional example (DDPMScheduler.add_noise, EMAModel).

    python bench/train_speed.py                      # CPU: mnist-small, batch 64
    python bench/train_speed.py --device cuda        # GPU: ddpm-cifar10 (35.7M), batch 128
    python bench/train_speed.py --preset cpu-64 --quick   # any unet preset, at its own channels and image size

All configurations are built and warmed up first (compilation included), then timed in turns
so that load changes on a shared machine hit all alike. The last line is ``ratio=X``: difflab /
diffusers images per second of the main comparison (GPU: both bf16 autocast + torch.compile;
CPU: each side at its best of fp32 and bf16 autocast).
"""

from __future__ import annotations

import contextlib
import sys
import tempfile

import torch
import torch.nn.functional as F
from common import forward_flops, interleaved, matrix_peak, process_setup, quiet_diffusers, speed_args, synthetic_images


def _image(preset: str) -> tuple[int, int]:
    """(channels, size) of the images a preset is made for."""
    from difflab.nets import PRESETS

    return PRESETS[preset]["in_channels"], PRESETS[preset]["image_size"]


def difflab_step(preset: str, batch: int, device, precision: str, compile_: bool):
    import difflab.training.trainer as trainer_mod
    from difflab.config import TrainConfig

    data = synthetic_images(max(8 * batch, 1024), *_image(preset))
    trainer_mod.open_data = lambda cfg: data  # the benchmark's in-memory dataset
    cfg = TrainConfig(data="synthetic", out=tempfile.mkdtemp(), model=preset, batch_size=batch,
                      precision=precision, compile=compile_, device=str(device), steps=10**9, warmup=10,
                      log_every=10**6, checkpoint_every=10**6, sample_every=0, process="linear")
    tr = trainer_mod.Trainer(cfg, progress=False, log=lambda *a: None)
    state = {"step": 0}

    def step():
        tr.train_step(state["step"])
        state["step"] += 1

    return step, tr.net


def diffusers_step(preset: str, batch: int, device, precision: str, compile_: bool):
    from diffusers import DDPMScheduler, UNet2DModel
    from diffusers.training_utils import EMAModel

    from difflab.nets import diffusers_twin_kwargs

    quiet_diffusers()
    unet = UNet2DModel(**diffusers_twin_kwargs(preset)).to(device)
    net = torch.compile(unet) if compile_ else unet
    opt = torch.optim.AdamW(unet.parameters(), lr=2e-4, **({"fused": True} if device.type == "cuda" else {}))
    ema = EMAModel(unet.parameters(), decay=0.999)
    ema.to(device)
    sched = DDPMScheduler(num_train_timesteps=1000)
    data = synthetic_images(max(8 * batch, 1024), *_image(preset)).images.to(device)
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if precision == "bf16" else contextlib.nullcontext

    def step():
        idx = torch.randint(0, len(data), (batch,), device=device)
        x = data[idx].float() / 127.5 - 1
        noise = torch.randn_like(x)
        t = torch.randint(0, 1000, (batch,), device=device)
        z = sched.add_noise(x, noise, t)
        with autocast():
            pred = net(z, t).sample
        loss = F.mse_loss(pred.float(), noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema.step(unet.parameters())

    return step, unet


def main(argv=None) -> int:
    args, device, preset, batch = speed_args(
        __doc__, argv, 128, lambda p: p.add_argument("--iters", type=int, default=None, help="timed steps per round"))
    gpu = device.type == "cuda"
    iters = args.iters or (30 if gpu else 5)
    warmup = 10 if gpu else 2
    if gpu:
        configs = {"diffusers": [("fp32", False), ("bf16", False), ("bf16", True)],
                   "difflab": [("bf16", False), ("bf16", True)]}
        main_cfg = ("bf16", True)
    else:
        both = [("fp32", False), ("bf16", False)] + ([("bf16", True)] if args.compile else [])
        configs = {"diffusers": both, "difflab": both}
        main_cfg = None  # each side at its best
    if args.quick:
        configs = {k: [main_cfg or ("bf16", False)] for k in ("diffusers", "difflab")}
    print(f"# training speed, {preset}, batch {batch}: {process_setup(device)}")
    peak = matrix_peak(device)
    runners, flops_img = {}, None
    for lib, build in (("diffusers", diffusers_step), ("difflab", difflab_step)):
        for precision, comp in configs[lib]:
            step, model = build(preset, batch, device, precision, comp)
            if flops_img is None:
                c, size = _image(preset)
                x = torch.randn(1, c, size, size, device=device)
                flops_img = forward_flops(model, x, torch.tensor([10.0], device=device))
            for _ in range(warmup + (5 if comp else 0)):  # compilation included
                step()
            runners[(lib, precision, comp)] = step
    sec = interleaved(runners, device, iters, repeats=args.repeats)
    results = {key: batch / s for key, s in sec.items()}
    for (lib, precision, comp), ips in results.items():
        frac = f"{3 * flops_img * ips / peak:6.1%}" if peak else "   n/a"
        print(f"{lib:10s} {precision:5s} compile={str(comp):5s} {ips:9.1f} img/s  peak fraction {frac}", flush=True)
    print(f"model: {flops_img / 1e9:.2f} GFLOP forward per image (x3 for a training step)"
          + (f"; measured bf16 matrix peak {peak / 1e12:.0f} TFLOP/s" if peak else ""))
    for cfg in configs["difflab"]:
        if cfg in configs["diffusers"]:
            print(f"same config {cfg[0]} compile={cfg[1]}: ratio {results[('difflab', *cfg)] / results[('diffusers', *cfg)]:.2f}")
    if main_cfg is None:  # each side at its best
        best = {lib: max((ips, key) for key, ips in results.items() if key[0] == lib) for lib in configs}
        (a, ka), (b, kb) = best["difflab"], best["diffusers"]
        print(f"best: difflab {ka[1]} compile={ka[2]} {a:.1f} img/s, diffusers {kb[1]} compile={kb[2]} {b:.1f} img/s")
        ratio = a / b
    else:
        ratio = results[("difflab", *main_cfg)] / results[("diffusers", *main_cfg)]
    print(f"ratio={ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
