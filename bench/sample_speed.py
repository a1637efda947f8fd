"""DDIM sampling throughput: difflab's sampler against diffusers' DDIMScheduler loop, same
UNet architecture, same batch and number of steps, in the same process.

    python bench/sample_speed.py                     # CPU: mnist-small, batch 64, 10 steps
    python bench/sample_speed.py --device cuda       # GPU: ddpm-cifar10, batch 512, DDIM-50

Variants: fp32; bf16 autocast; pure bf16 weights; pure bf16 + torch.compile (difflab also
with CUDA-graph capture of the whole denoiser call, mode="reduce-overhead"). The first call of a
compiled variant (compilation included) is timed separately. The last line is ``ratio=X``,
difflab / diffusers images per second at each side's best (CPU: fp32).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time

import torch
from common import device_from_arg, env_summary, sync, timed


def diffusers_sampler(preset, batch, steps, device, variant):
    from diffusers import DDIMScheduler, UNet2DModel

    from difflab.nets import diffusers_twin_kwargs

    unet = UNet2DModel(**diffusers_twin_kwargs(preset)).to(device).eval()
    dtype = torch.bfloat16 if variant in ("bf16", "bf16+compile") else torch.float32
    unet = unet.to(dtype)
    net = torch.compile(unet) if variant == "bf16+compile" else unet
    sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", timestep_spacing="trailing")
    sched.set_timesteps(steps)
    c = unet.config.in_channels
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if variant == "autocast" else contextlib.nullcontext

    @torch.no_grad()
    def run():
        x = torch.randn(batch, c, 32, 32, device=device, dtype=dtype)
        for t in sched.timesteps:
            with autocast():
                eps = net(x, t).sample
            x = sched.step(eps, t, x).prev_sample
        return x

    return run


def difflab_sampler(preset, batch, steps, device, variant):
    from difflab import nets
    from difflab.denoiser import Denoiser
    from difflab.processes.gaussian import linear_schedule
    from difflab.samplers import generate

    net = nets.from_preset(preset).to(device).eval().to(memory_format=torch.channels_last)
    if variant.startswith("bf16"):
        net = net.to(torch.bfloat16)
    if variant == "bf16+compile":
        net = torch.compile(net)
    den = Denoiser(net, linear_schedule(), "eps")
    if variant == "bf16+graphs":
        den = torch.compile(den, mode="reduce-overhead")
        den.process = den._orig_mod.process
    shape = (net.config["in_channels"] if isinstance(net, torch.nn.Module) and hasattr(net, "config")
             else 3, 32, 32)
    if not isinstance(shape[0], int):
        shape = (3, 32, 32)
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if variant == "autocast" else contextlib.nullcontext
    seed = {"s": 0}

    def run():
        with autocast():
            out = generate(den, batch, shape, seed=seed["s"], sampler="ddim", steps=steps, batch_size=batch,
                           device=device)
        seed["s"] += 1
        return out

    return run


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--preset", default=None)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--quick", action="store_true", help="only the main comparison")
    args = p.parse_args(argv)
    device = device_from_arg(args.device)
    gpu = device.type == "cuda"
    preset = args.preset or ("ddpm-cifar10" if gpu else "mnist-small")
    batch = args.batch or (512 if gpu else 64)
    steps = args.steps or (50 if gpu else 10)
    if gpu:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    variants = {"diffusers": ["fp32", "bf16", "bf16+compile"] if gpu else ["fp32", "bf16"],
                "difflab": ["bf16", "bf16+compile", "bf16+graphs"] if gpu else ["fp32", "bf16"]}
    if args.quick:
        variants = {k: ["bf16+compile" if gpu else "fp32"] for k in variants}
    print(f"# DDIM-{steps} sampling, {preset}, batch {batch}: {env_summary(device)}")
    best = {}
    for lib, build in (("diffusers", diffusers_sampler), ("difflab", difflab_sampler)):
        for v in variants[lib]:
            run = build(preset, batch, steps, device, v)
            first = ""
            if "compile" in v or "graphs" in v:
                sync(device)
                t0 = time.perf_counter()
                run()
                sync(device)
                first = f"  first call {time.perf_counter() - t0:6.1f} s"
            sec = timed(run, device, iters=1, warmup=0 if first else 1, repeats=2)
            ips = batch / sec
            best[lib] = max(best.get(lib, 0.0), ips)
            print(f"{lib:10s} {v:13s} {ips:9.1f} img/s{first}", flush=True)
            del run
            if gpu:
                torch.cuda.empty_cache()
    print(f"ratio={best['difflab'] / best['diffusers']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
