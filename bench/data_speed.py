"""Data loading at scale: a synthetic packed set of N colour images (default 1,000,000 at 64x64), written
straight into difflab's shard format, then

- the time from ``difflab train --data DIR`` to the end of its first training step (target <= 60 s),
- the peak resident memory of that process and its loader workers (target <= 3 GB) and the device memory
  (nothing proportional to N),
- the time a training step waits for its batch, as a fraction of the step, at 32 and 64 px (target <= 10%).

    python bench/data_speed.py [--n 1000000] [--dir /tmp/difflab-data-speed] [--steps 20] [--device auto]

Each measurement runs in a fresh process (``--child``), as a user's command would.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_description, write_json  # noqa: E402


def write_synthetic(folder: Path, n: int, size: int, seed: int = 0) -> float:
    """A packed set of ``n`` random colour images with 10 classes; returns the seconds it took."""
    from difflab.data.shards import ShardWriter

    t = time.perf_counter()
    rng = np.random.default_rng(seed)
    writer = ShardWriter(folder, (3, size, size), n)
    chunk = 8192
    for lo in range(0, n, chunk):
        writer.add(rng.integers(0, 256, (min(chunk, n - lo), 3, size, size), dtype=np.uint8))
    writer.finish("synthetic", rng.integers(0, 10, n), [str(k) for k in range(10)])
    return time.perf_counter() - t


def peak_rss_gb(workers: int) -> float:
    """Peak resident memory of this process plus ``workers`` times that of its largest finished child (a loader
    worker): an upper bound of the processes' sum (a forked worker's resident pages include the parent's)."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return (own + workers * kids) / 2**20  # kB -> GB


def _tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (from /proc)."""
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                todo += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                pass
    return found


def _pss_kb(pid: int) -> dict[str, int]:
    try:
        lines = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
    except OSError:
        return {}
    return {k: int(v.split()[0]) for k, v in (line.split(":", 1) for line in lines[1:] if ":" in line)}


class PssPeak:
    """The peak of the summed proportional set size (PSS: shared pages split between the processes that map
    them, so nothing is counted twice) of this process and its descendants, sampled every 50 ms on a thread;
    ``anon`` is the part that is not file-backed (the memory-mapped shards are page cache the kernel can drop)."""

    def __init__(self):
        import threading

        self.total = self.anon = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.wait(0.05):
            tot = anon = 0
            for pid in _tree(os.getpid()):
                r = _pss_kb(pid)
                tot, anon = tot + r.get("Pss", 0), anon + r.get("Pss_Anon", 0) + r.get("Pss_Shmem", 0)
            self.total, self.anon = max(self.total, tot / 2**20), max(self.anon, anon / 2**20)

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join()
        return {"peak_pss_gb": self.total, "peak_pss_anon_gb": self.anon}


def child_first_step(data: str, device: str, started: float, result: str) -> None:
    """Run ``difflab train --data DATA`` and stop the process when its first step is done."""
    import torch

    from difflab.cli import main
    from difflab.training import trainer

    real = trainer.Trainer.train_step
    pss = PssPeak()

    def first(self, step):
        loss = real(self, step)
        float(loss)  # the step is done on the device
        self.loader.close()  # the workers exit, so their peak counts in RUSAGE_CHILDREN
        seconds = time.time() - started
        device_gb = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
        Path(result).write_text(json.dumps({"seconds": seconds, "peak_rss_gb": peak_rss_gb(self.loader.workers),
                                            **pss.stop(), "device_gb": device_gb, "describe": self.describe()}))
        os._exit(0)

    trainer.Trainer.train_step = first
    out = tempfile.mkdtemp(prefix="difflab-data-speed-run-")
    main(["train", "--data", data, "--out", f"{out}/run", "--steps", "10", "--sample-every", "0", "--device", device])


def child_step_share(data: str, device: str, steps: int, result: str) -> None:
    """The fraction of a training step spent waiting for its batch, with the defaults for ``data``."""
    import torch

    from difflab.config import TrainConfig
    from difflab.training.trainer import Trainer

    out = tempfile.mkdtemp(prefix="difflab-data-speed-run-")
    pss = PssPeak()
    tr = Trainer(TrainConfig(data=data, out=f"{out}/run", steps=steps + 3, sample_every=0, device=device),
                 progress=False, log=lambda *a: None)
    waits = []
    get = tr.loader.get

    def timed_get(step, micro):
        t = time.perf_counter()
        got = get(step, micro)
        waits.append(time.perf_counter() - t)
        return got

    tr.loader.get = timed_get
    cuda = tr.device.type == "cuda"
    for s in range(3):  # warm-up: workers start, kernels are chosen
        tr.train_step(s)
    if cuda:
        torch.cuda.synchronize()
    waits.clear()
    t = time.perf_counter()
    for s in range(3, 3 + steps):
        tr.train_step(s)
    if cuda:
        torch.cuda.synchronize()
    step = (time.perf_counter() - t) / steps
    wait = sum(waits) / steps
    peak = pss.stop()
    tr.loader.close()
    Path(result).write_text(json.dumps({"step_ms": step * 1e3, "wait_ms": wait * 1e3, "share": wait / step,
                                        "batch": tr.cfg.batch_size, "workers": tr.loader.workers,
                                        "describe": tr.describe(), "peak_rss_gb": peak_rss_gb(tr.loader.workers), **peak}))


def _child(*args: str) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        result = f.name
    subprocess.run([sys.executable, __file__, "--child", *args, result], check=True)
    found = json.loads(Path(result).read_text())
    os.unlink(result)
    return found


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1_000_000, help="images in the 64 px set")
    p.add_argument("--n32", type=int, default=200_000, help="images in the 32 px set (the step share only)")
    p.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "difflab-data-speed"))
    p.add_argument("--steps", type=int, default=20, help="timed steps for the step share")
    p.add_argument("--device", default="auto")
    p.add_argument("--keep", action="store_true", help="keep the packed sets (else removed at the end)")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        kind, *rest = args.child
        if kind == "first":
            child_first_step(rest[0], rest[1], float(rest[2]), rest[3])
        else:
            child_step_share(rest[0], rest[1], int(rest[2]), rest[3])
        return 0

    print(f"CPU: {cpu_description()}")
    root = Path(args.dir)
    sets = {64: (root / f"n{args.n}-64", args.n), 32: (root / f"n{args.n32}-32", args.n32)}
    results: dict = {"cpu": cpu_description(), "n": args.n, "n32": args.n32}
    for size, (folder, n) in sets.items():
        if not (folder / "difflab-shards.json").exists():
            seconds = write_synthetic(folder, n, size)
            print(f"wrote {n:,} synthetic {size}x{size} colour images to {folder} in {seconds:.1f} s")
    first = _child("first", str(sets[64][0]), args.device, repr(time.time()))
    results["first_step"] = first
    print(f"{first['describe']}")
    print(f"command to first step done: {first['seconds']:.1f} s (target <= 60); peak memory of the process and its "
          f"workers {first['peak_pss_gb']:.2f} GB PSS, {first['peak_pss_anon_gb']:.2f} GB of it not file-backed "
          f"(target <= 3; the sum of peak RSS, which counts a forked worker's shared pages twice: "
          f"{first['peak_rss_gb']:.2f} GB); device memory {first['device_gb']:.2f} GB")
    for size, (folder, n) in sets.items():
        share = _child("share", str(folder), args.device, str(args.steps))
        results[f"share_{size}"] = share
        print(f"{size} px ({n:,} images, batch {share['batch']}, {share['workers']} workers): step "
              f"{share['step_ms']:.1f} ms, waiting for data {share['wait_ms']:.2f} ms = {share['share']:.1%} "
              f"(target <= 10%); peak memory {share['peak_pss_gb']:.2f} GB PSS ({share['peak_pss_anon_gb']:.2f} GB not "
              f"file-backed; summed peak RSS {share['peak_rss_gb']:.2f} GB)")
    write_json(args.json, results)
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
