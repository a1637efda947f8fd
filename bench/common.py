"""Shared pieces of the speed benchmarks: timing, FLOP counting, the device's matrix peak,
and a synthetic in-memory dataset (the benchmarks measure speed, not quality)."""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # run from a checkout without install


def device_from_arg(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def bench_device(name: str) -> torch.device:
    """The device to measure on ("auto": the GPU when there is one), with cuDNN autotuning and TF32
    allowed on GPUs (both libraries get the same settings)."""
    device = device_from_arg(name)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return device


def speed_args(doc: str, argv, gpu_batch: int, extra=None):
    """Parse the flags both speed scripts take (plus ``extra(parser)``'s); returns
    (args, device, preset, batch): mnist-small at batch 64 on a CPU, ddpm-cifar10 at ``gpu_batch`` on a GPU."""
    import argparse

    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--preset", default=None, help="mnist-small (CPU default) or ddpm-cifar10 (GPU default)")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--repeats", type=int, default=3, help="timed rounds (each configuration once per round, in turn)")
    p.add_argument("--compile", action="store_true", help="on a CPU, also the compiled bf16 configurations (GPU: always)")
    p.add_argument("--quick", action="store_true", help="only the main comparison (CPU: bf16 only)")
    if extra is not None:
        extra(p)
    args = p.parse_args(argv)
    device = bench_device(args.device)
    gpu = device.type == "cuda"
    preset = args.preset or ("ddpm-cifar10" if gpu else "mnist-small")
    return args, device, preset, args.batch or (gpu_batch if gpu else 64)


def quiet_diffusers() -> None:
    """Silence diffusers' log line on every ``.to(bfloat16)`` and dynamo's notes on its cached helpers."""
    import warnings

    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", message="Dynamo detected a call to a `functools.lru_cache`")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, iters: int, warmup: int, repeats: int = 3) -> float:
    """Median over ``repeats`` of the mean seconds per call of ``fn`` (after ``warmup`` calls)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        sync(device)
        times.append((time.perf_counter() - t0) / iters)
    return statistics.median(times)


def interleaved(runners: dict, device: torch.device, iters: int, repeats: int = 3) -> dict:
    """Median seconds per call of each runner, timed in turns (A B C A B C ...) so that a change of
    load on a shared machine hits every runner alike. Warm-up (and compilation) is the caller's."""
    times: dict = {name: [] for name in runners}
    for _ in range(repeats):
        for name, fn in runners.items():
            sync(device)
            t0 = time.perf_counter()
            for _ in range(iters):
                fn()
            sync(device)
            times[name].append((time.perf_counter() - t0) / iters)
    return {name: statistics.median(t) for name, t in times.items()}


def forward_flops(model, x: torch.Tensor, t: torch.Tensor) -> float:
    """FLOPs of one forward pass (matrix and convolution work counted by torch's FlopCounterMode)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x, t)
    return float(counter.get_total_flops())


def matrix_peak(device: torch.device, dtype=torch.bfloat16) -> float | None:
    """Measured FLOP/s of a large matrix product on the device (the ceiling to compare with)."""
    if device.type != "cuda":
        return None
    n = 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sec = timed(lambda: a @ b, device, iters=10, warmup=3)
    return 2 * n**3 / sec


def synthetic_images(n: int, channels: int, size: int, seed: int = 0):
    """An ImageData of random uint8 images with labels (speed does not depend on content)."""
    from difflab.data import ImageData

    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, channels, size, size), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, 10, (n,), generator=g)
    return ImageData(images=images, labels=labels, class_names=[str(i) for i in range(10)], name="synthetic")


def process_setup(device: torch.device) -> str:
    """Apply the process-wide settings difflab's trainer and sampler apply on a CPU (flush denormals,
    glibc malloc keeping freed memory) -- to the whole process, so diffusers gets them too -- and
    describe the environment in one line."""
    tuned = ""
    if device.type == "cpu":
        from difflab import runtime

        runtime.tune_cpu()
        tuned = f"; denormals flushed, malloc reuse {'on' if runtime.tune_malloc() else 'off'} (both sides)"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{cpu_description()}, {torch.get_num_threads()} threads"
    env = ", ".join(f"{k}={os.environ.get(k, '-')}" for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY"))
    return f"torch {torch.__version__} on {name}; {env}{tuned}"


def cpu_description() -> str:
    """The CPU model and the flags that decide its fast paths (AVX-512, bf16, AMX), from /proc/cpuinfo."""
    model, flags = "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model == "unknown CPU":
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16")
    have = [f for f in wanted if f in flags]
    return f"{model} ({os.cpu_count()} cores; {' '.join(have) or 'no AVX2/AVX-512'})"


def write_json(path: str | None, obj) -> None:
    """Write ``obj`` as indented JSON to ``path``, atomically (nothing when ``path`` is None)."""
    if path:
        from difflab.files import write_text

        write_text(path, json.dumps(obj, indent=2))
