"""DDIM sampling throughput: difflab's sampler against diffusers' DDIMScheduler loop, same
UNet architecture, same batch and number of steps, in the same process.

    python bench/sample_speed.py                     # CPU: mnist-small, batch 64, 10 steps
    python bench/sample_speed.py --device cuda       # GPU: ddpm-cifar10, batch 512, DDIM-50

Variants: fp32; pure bf16 weights; pure bf16 + torch.compile (difflab also with CUDA-graph
capture of the whole denoiser call, mode="reduce-overhead"; on a CPU the compiled variants need
``--compile`` and use inductor's weight freezing and C++ wrapper on both sides; diffusers also
without the C++ wrapper, inductor's default). difflab runs channels-last,
diffusers in its default layout (NCHW; channels-last does not speed it up). All variants are
built and warmed up first, then timed in turns so that load changes hit all alike. The first call
of a compiled variant (compilation included) is timed separately. The last line is ``ratio=X``,
difflab / diffusers images per second at each side's best variant.
"""

from __future__ import annotations

import contextlib
import sys
import time

import torch
from common import interleaved, process_setup, quiet_diffusers, speed_args, sync


def diffusers_sampler(preset, batch, steps, device, variant):
    from diffusers import DDIMScheduler, UNet2DModel

    from difflab.nets import diffusers_twin_kwargs

    quiet_diffusers()
    unet = UNet2DModel(**diffusers_twin_kwargs(preset)).to(device).eval().requires_grad_(False)
    dtype = torch.bfloat16 if variant.startswith("bf16") else torch.float32
    unet = unet.to(dtype)
    net = torch.compile(unet) if "compile" in variant else unet
    # "py-wrapper": the CPU compile without the C++ wrapper (inductor's settings are per context)
    import torch._inductor.config as inductor_config

    settings = inductor_config.patch(cpp_wrapper=False) if variant.endswith("py-wrapper") else contextlib.nullcontext()
    sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", timestep_spacing="trailing")
    sched.set_timesteps(steps)
    c = unet.config.in_channels

    @torch.no_grad()
    def run():
        x = torch.randn(batch, c, 32, 32, device=device, dtype=dtype)
        with settings:
            for t in sched.timesteps:
                eps = net(x, t).sample
                x = sched.step(eps, t, x).prev_sample
        return x

    return run


def difflab_sampler(preset, batch, steps, device, variant):
    from difflab import nets
    from difflab.denoiser import Denoiser
    from difflab.processes.gaussian import linear_schedule
    from difflab.runs.draw import compile_for_sampling
    from difflab.samplers import generate

    dtype = torch.bfloat16 if variant.startswith("bf16") else torch.float32
    net = nets.from_preset(preset).to(device, dtype).eval().requires_grad_(False).to(memory_format=torch.channels_last)
    if variant == "bf16+compile":  # CPUs: what `difflab sample --compile` does (frozen weights, C++ wrapper)
        net = torch.compile(net) if device.type == "cuda" else compile_for_sampling(net, device)
    den = Denoiser(net, linear_schedule(), "eps")
    if variant == "bf16+graphs":
        den = torch.compile(den, mode="reduce-overhead")
        den.process = den._orig_mod.process
    shape = (nets.PRESETS[preset]["in_channels"], 32, 32)
    seed = {"s": 0}

    def run():
        out = generate(den, batch, shape, seed=seed["s"], sampler="ddim", steps=steps, batch_size=batch,
                       device=device)
        seed["s"] += 1
        return out

    return run


def main(argv=None) -> int:
    args, device, preset, batch = speed_args(
        __doc__, argv, 512, lambda p: p.add_argument("--steps", type=int, default=None, help="DDIM steps"))
    gpu = device.type == "cuda"
    steps = args.steps or (50 if gpu else 10)
    if gpu:
        variants = {"diffusers": ["fp32", "bf16", "bf16+compile"], "difflab": ["bf16", "bf16+compile", "bf16+graphs"]}
        if args.quick:
            variants = {"diffusers": ["bf16+compile"], "difflab": ["bf16+compile"]}
    else:
        import torch._inductor.config as inductor_config

        # CPU inference: constant weights pre-packed for oneDNN, and the graph run by a C++ wrapper (both sides)
        inductor_config.freezing = True
        inductor_config.cpp_wrapper = True
        variants = {k: ["fp32", "bf16"] + (["bf16+compile"] if args.compile else []) for k in ("diffusers", "difflab")}
        if args.compile:  # diffusers also as inductor runs it by default: its best counts
            variants["diffusers"].append("bf16+compile+py-wrapper")
        if args.quick:
            variants = {k: ["bf16"] for k in variants}
    print(f"# DDIM-{steps} sampling, {preset}, batch {batch}: {process_setup(device)}")
    runners, first = {}, {}
    for lib, build in (("diffusers", diffusers_sampler), ("difflab", difflab_sampler)):
        for v in variants[lib]:
            run = build(preset, batch, steps, device, v)
            sync(device)
            t0 = time.perf_counter()
            run()  # warm-up; compilation for the compiled variants
            sync(device)
            if "compile" in v or "graphs" in v:
                first[(lib, v)] = time.perf_counter() - t0
                run()
            runners[(lib, v)] = run
    sec = interleaved(runners, device, iters=1, repeats=args.repeats)
    best = {}
    for (lib, v), s in sec.items():
        ips = batch / s
        best[lib] = max(best.get(lib, (0.0, "")), (ips, v))
        note = f"  first call {first[(lib, v)]:6.1f} s" if (lib, v) in first else ""
        print(f"{lib:10s} {v:24s} {ips:9.1f} img/s{note}", flush=True)
    for v in variants["difflab"]:
        if v in variants["diffusers"]:
            print(f"same variant {v:24s} ratio {sec[('diffusers', v)] / sec[('difflab', v)]:.2f}")
    (a, va), (b, vb) = best["difflab"], best["diffusers"]
    print(f"best: difflab {va} {a:.1f} img/s, diffusers {vb} {b:.1f} img/s")
    print(f"ratio={a / b:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
