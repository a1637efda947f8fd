"""Training and sampling on several processes (torchrun, gloo on the CPU): two processes give the
weights of one process with the same global batch, a run resumes with another number of processes,
every rank holds the same weights and EMA, only rank 0 writes, all ranks stop after the same step
(signal or time limit), and sharded sampling is byte-identical to one process.

Run as a script (``torchrun ... tests/test_distributed.py -- worker DIR``), this file is the
worker of :func:`test_ranks_agree_and_only_rank_0_writes`."""

from __future__ import annotations

import csv
import gc
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from difflab.config import TrainConfig
from difflab.runs.checkpoint import latest_checkpoint
from difflab.runs.distributed import DistContext, sample_sharded, shard
from difflab.training.trainer import Trainer

# float32 on every CPU: with bf16 autocast (auto where the CPU has AVX-512 BF16 or AMX) each rank's half batch
# rounds differently from the whole batch, and two processes no longer match one within these tolerances
RUN = {"data": "digits", "model": "tiny", "dropout": 0.0, "batch_size": 16, "log_every": 3, "checkpoint_every": 3,
       "sample_every": 0, "sample_steps": 2, "warmup": 2, "lr": 1e-3, "precision": "fp32"}
QUIET = {"progress": False, "log": lambda *a: None}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
SAMPLE = ["--n", "7", "--steps", "3", "--batch-size", "3", "--sampler", "ddpm"]


def _cfg(out: Path, **kw) -> TrainConfig:
    return TrainConfig(**{**RUN, **kw}, out=str(out))


def _flags(**kw) -> list[str]:
    return [a for k, v in {**RUN, **kw}.items() for a in (f"--{k.replace('_', '-')}", str(v))]


def _rel_diff(a: Path, b: Path, prefix: str, init: dict[str, torch.Tensor]) -> float:
    """||w_a - w_b|| / ||w_a - w_init|| over the tensors under ``prefix`` of two runs' latest checkpoints.

    Not a max-abs tolerance: Adam turns float noise in a near-zero gradient into an lr-sized step of
    either sign, so a few untrained biases differ by about lr however exact the rest is."""
    ta, _ = latest_checkpoint(a / "checkpoints")
    tb, _ = latest_checkpoint(b / "checkpoints")
    diff = sum(float((ta[prefix + k].double() - tb[prefix + k].double()).square().sum()) for k in init)
    moved = sum(float((ta[prefix + k].double() - init[k].double()).square().sum()) for k in init)
    return (diff / moved) ** 0.5


def _losses(run: Path) -> list[tuple[int, float]]:
    rows = list(csv.reader((run / "loss.csv").read_text().splitlines()))[1:]
    return [(int(r[0]), float(r[1])) for r in rows]


def test_shard_blocks_cover_in_order():
    for n, world, block in [(7, 2, 1), (1, 2, 1), (10, 3, 4), (5, 4, 1), (64, 3, 16)]:
        parts = [shard(n, DistContext(r, world), block) for r in range(world)]
        assert [i for p in parts for i in p] == list(range(n))
        assert all(p.start % block == 0 for p in parts if len(p))
    assert torch.equal(sample_sharded(lambda s, c: torch.arange(s, s + c), 5, DistContext()), torch.arange(5))


def test_two_processes_equal_one_and_resume_with_one(tmp_path):
    """`difflab train --nproc 2` for 6 steps = one process for 6 steps; one process resumes it to 10."""
    two, one = tmp_path / "two", tmp_path / "one"
    r = subprocess.run([sys.executable, "-m", "difflab", "train", "--nproc", "2", *_flags(), "--out", str(two),
                        "--steps", "6", "--quiet"], check=False, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "done: step 6" in r.stdout
    trainer = Trainer(_cfg(one, steps=6), **QUIET)
    init = {k: v.clone() for k, v in trainer.net.state_dict().items()}
    trainer.run()
    assert latest_checkpoint(two / "checkpoints")[1]["world_size"] == 2
    assert _rel_diff(one, two, "model.", init) < 0.01 and _rel_diff(one, two, "ema.", init) < 0.01
    assert [s for s, _ in _losses(two)] == [s for s, _ in _losses(one)] == [3, 6]
    assert np.allclose([v for _, v in _losses(two)], [v for _, v in _losses(one)], rtol=1e-4)  # global mean
    Trainer(_cfg(two, steps=10), resume=True, **QUIET).run()
    Trainer(_cfg(one, steps=10), resume=True, **QUIET).run()  # = an uninterrupted 10 steps (test_train)
    assert _rel_diff(one, two, "model.", init) < 0.01 and _rel_diff(one, two, "ema.", init) < 0.01


@pytest.mark.slow
def test_two_nodes_with_c10d_rendezvous_equal_one_process(tmp_path):
    """The documented multi-node command, with both "nodes" on this machine."""
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        port = sock.getsockname()[1]
    train = ["-m", "difflab", "--", "train", *_flags(), "--out", str(tmp_path / "two"), "--steps", "6", "--quiet"]
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node-rank={rank}",
                               "--nproc-per-node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=localhost:{port}",
                               "--rdzv-id=difflab-test", *train], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for rank in (0, 1)]
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs
    trainer = Trainer(_cfg(tmp_path / "one", steps=6), **QUIET)
    init = {k: v.clone() for k, v in trainer.net.state_dict().items()}
    trainer.run()
    assert latest_checkpoint(tmp_path / "two" / "checkpoints")[1]["world_size"] == 2
    assert _rel_diff(tmp_path / "one", tmp_path / "two", "model.", init) < 0.01


def test_ranks_agree_and_only_rank_0_writes(tmp_path):
    r = subprocess.run([*TORCHRUN, __file__, "--", "worker", str(tmp_path)], check=False, capture_output=True,
                       text=True, timeout=400, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout + r.stderr  # a hung worker prints its threads' stacks and exits 1
    reports = [json.loads((tmp_path / f"report-{rank}.json").read_text()) for rank in (0, 1)]
    # no DDP reducer outlives the trainers' runs: one holding the process group's last reference froze
    # rank 1 at exit about once in ten runs on a loaded machine (gloo's thread waited for the GIL)
    assert reports[0]["ddp_alive"] == reports[1]["ddp_alive"] == 0
    assert reports[0]["exited"] and reports[1]["exited"]
    runs = tmp_path / "runs"
    assert reports[0]["digest"] == reports[1]["digest"]  # weights and EMA bit-identical on both ranks
    assert reports[1]["writes"] == [] and any("step-0000006" in w for w in reports[0]["writes"])
    # rank 1 alone got Ctrl-C twice during step 3: both ranks stop after step 4 and save it
    assert reports[0]["signal"] == reports[1]["signal"] == [4, "signal", signal.SIGINT]
    assert latest_checkpoint(runs / "signal" / "checkpoints")[1]["step"] == 4
    steps = {rep["time"][0] for rep in reports}
    assert len(steps) == 1 and {rep["time"][1] for rep in reports} == {"time-limit"}
    assert latest_checkpoint(runs / "time" / "checkpoints")[1]["step"] == steps.pop() > 0
    assert reports[0]["one_of_two"] == reports[1]["one_of_two"] == [[0.0]]  # rank 1's shard was empty

    from difflab.cli import main

    assert main(["sample", "--run", str(runs / "plain"), *SAMPLE, "--save-npz", str(tmp_path / "one.npz"),
                 "--out", str(tmp_path / "one.png")]) == 0
    a, b = np.load(tmp_path / "one.npz")["images"], np.load(runs / "two.npz")["images"]
    assert a.shape == (7, 8, 8, 1) and np.array_equal(a, b)
    assert (tmp_path / "one.png").read_bytes() == (runs / "two.png").read_bytes()


def _worker(folder: Path) -> None:
    """Two ranks: a plain run, a signal on rank 1 only, a time limit, sharded sampling; each rank writes
    its report (what it saw, and every file it wrote under runs/) to report-RANK.json."""
    import faulthandler

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    faulthandler.dump_traceback_later(300, exit=True)  # a hang shows where, well inside the test's timeout
    runs = folder / "runs"
    writes: list[str] = []
    sys.addaudithook(lambda event, args: _record_write(event, args, str(runs), writes))
    ctx = DistContext.from_env("cpu")
    tr = Trainer(_cfg(runs / "plain", steps=6), **QUIET)
    tr.run()
    state = [*tr.net.state_dict().values(), *tr.ema.state_dict().values()]
    digest = hashlib.sha256(b"".join(t.numpy().tobytes() for t in state)).hexdigest()

    tr = Trainer(_cfg(runs / "signal", steps=1000, checkpoint_every=1000), **QUIET)
    if ctx.rank == 1:
        loss = tr.method.loss

        def interrupted_loss(net, x, cond, step, seeds):
            if step == 3:
                os.kill(os.getpid(), signal.SIGINT)
                os.kill(os.getpid(), signal.SIGINT)  # a second Ctrl-C must not abort one rank
            return loss(net, x, cond, step, seeds)

        tr.method.loss = interrupted_loss
    res = tr.run()
    report = {"digest": digest, "signal": [res.step, res.stopped_by, res.signal]}
    res = Trainer(_cfg(runs / "time", steps=100_000, time_limit=0.02, checkpoint_every=100_000), **QUIET).run()
    report["time"] = [res.step, res.stopped_by]
    report["one_of_two"] = sample_sharded(lambda s, c: torch.arange(s, s + c).view(-1, 1).float(), 1, ctx).tolist()
    dist.barrier()
    gc.collect()
    report["ddp_alive"] = sum(isinstance(o, DistributedDataParallel) for o in gc.get_objects())

    from difflab.cli import main

    code = main(["sample", "--run", str(runs / "plain"), *SAMPLE, "--save-npz", str(runs / "two.npz"),
                 "--out", str(runs / "two.png")])  # ends the process group
    assert code == 0
    report["writes"] = writes
    (folder / f"report-{ctx.rank}.json").write_text(json.dumps(report))
    del tr
    gc.collect()  # what remains of the trainers goes while the group is destroyed: must not hang
    report["exited"] = True
    (folder / f"report-{ctx.rank}.json").write_text(json.dumps(report))


def _record_write(event: str, args: tuple, root: str, writes: list[str]) -> None:
    """Audit hook: note every file created, opened for writing, renamed or removed under root."""
    if event == "open":
        path, mode, flags = args
        writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
            isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
    elif event in ("os.rename", "os.remove", "os.mkdir", "os.rmdir"):
        path, writing = args[0], True
    else:  # (events such as socket.gethostname carry no path)
        return
    if writing and isinstance(path, (str, bytes, os.PathLike)) and os.fsdecode(path).startswith(root):
        writes.append(f"{event} {os.fsdecode(path)}")


if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:
    _worker(Path(sys.argv[2]))
