"""Runs that lose nothing when killed: real training processes are SIGKILLed at random moments (also
in the middle of a checkpoint write) and resumed, and end with the weights of an uninterrupted run,
bit for bit; every checkpoint left on disk verifies. SIGTERM/SIGINT save the current step and exit
0/130, with one process or two."""

from __future__ import annotations

import csv
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from difflab.config import TrainConfig
from difflab.errors import CheckpointError
from difflab.runs.checkpoint import latest_checkpoint, list_checkpoints, save_checkpoint, verify_checkpoint
from difflab.training.trainer import Trainer

RUN = {"data": "digits", "model": "tiny", "batch_size": 16, "log_every": 5, "checkpoint_every": 5,
       "sample_every": 0, "sample_steps": 2, "warmup": 2, "lr": 1e-3, "keep": 3}


def _flags(**kw) -> list[str]:
    return [a for k, v in kw.items() for a in (f"--{k.replace('_', '-')}", str(v))]


class Proc:
    """``python -m difflab ARGS`` in the background, its merged output collected line by line."""

    def __init__(self, args: list[str], slow_checkpoint: float = 0.0, new_session: bool = False):
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(torch.get_num_threads()),
               "DIFFLAB_TEST_SLOW_CHECKPOINT": str(slow_checkpoint)}
        self.p = subprocess.Popen([sys.executable, "-m", "difflab", *args], stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True, env=env, start_new_session=new_session)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=lambda: self.lines.extend(self.p.stdout), daemon=True)
        self._reader.start()

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for(self, ready, timeout: float = 180.0) -> None:
        """Poll ``ready()`` until true; fail if the process ends first."""
        end = time.monotonic() + timeout
        while not ready():
            assert self.p.poll() is None, f"exited with {self.p.returncode} before expected:\n{self.output}"
            assert time.monotonic() < end, f"timed out:\n{self.output}"
            time.sleep(0.005)

    def training(self) -> bool:
        return any(line.startswith("difflab: ") for line in self.lines)  # the run's description line

    def finish(self, timeout: float = 300.0) -> int:
        rc = self.p.wait(timeout)
        self._reader.join(10)
        return rc


def _train(out: Path, steps: int, nproc: int = 1, **kw) -> list[str]:
    return ["train", *_flags(**{**RUN, **kw}), "--out", str(out), "--steps", str(steps), "--resume", "--quiet",
            *(["--nproc", str(nproc)] if nproc > 1 else [])]


def _assert_disk_sound(folder: Path) -> list[int]:
    """Every checkpoint whose JSON exists verifies; returns their steps."""
    found = list_checkpoints(folder)
    bad = [p.name for p in found if not verify_checkpoint(p)]
    assert not bad, f"corrupt checkpoints {bad}"
    return [int(p.stem.split("-")[1]) for p in found]


def _log(run: Path) -> list[list[str]]:
    """(step, loss) rows of a run's loss.csv."""
    return [r[:2] for r in csv.reader((run / "loss.csv").read_text().splitlines()[1:])]


def _kill_during_checkpoint(proc: Proc, folder: Path, stage: str) -> None:
    """SIGKILL while a checkpoint is half-written: its tensor file still a .tmp, or renamed but without JSON."""
    def caught() -> bool:
        if not folder.is_dir():
            return False
        if stage == "tmp":
            return any(folder.glob(".step-*.safetensors.*.tmp"))
        return any(not p.with_suffix(".json").exists() for p in folder.glob("step-*.safetensors"))

    proc.wait_for(caught)
    proc.p.kill()
    proc.finish()
    assert caught(), "the kill should have left a half-written checkpoint"


def _kill_loop(tmp_path: Path, steps: int, random_kills: int, seed: int) -> None:
    out, folder = tmp_path / "killed", tmp_path / "killed" / "checkpoints"
    Trainer(TrainConfig(**RUN, out=str(tmp_path / "whole"), steps=steps), progress=False, log=lambda *a: None).run()
    rng = random.Random(seed)
    for stage in ["tmp", "json", *["random"] * random_kills]:
        proc = Proc(_train(out, steps), slow_checkpoint=0.3 if stage != "random" else 0.0)
        if stage == "random":
            proc.wait_for(proc.training)
            time.sleep(rng.uniform(0.0, 0.8))
            proc.p.kill()
            proc.finish()
        else:
            _kill_during_checkpoint(proc, folder, stage)
        _assert_disk_sound(folder)
    proc = Proc(_train(out, steps))
    assert proc.finish() == 0, proc.output
    assert _assert_disk_sound(folder)[-1] == steps
    assert not list(folder.glob(".*.tmp")) and all(p.with_suffix(".json").exists() for p in folder.glob("*.safetensors"))
    a, _ = latest_checkpoint(tmp_path / "whole" / "checkpoints")
    b, _ = latest_checkpoint(folder)
    assert a.keys() == b.keys()
    for k in a:  # model, EMA and optimiser state
        assert torch.equal(a[k], b[k]), k
    assert _log(tmp_path / "whole") == _log(out)  # the same steps logged once each, the same losses


def test_sigkill_at_random_moments_loses_nothing(tmp_path):
    _kill_loop(tmp_path, steps=30, random_kills=1, seed=1)


@pytest.mark.slow
def test_sigkill_many_times_loses_nothing(tmp_path):
    _kill_loop(tmp_path, steps=120, random_kills=12, seed=int(time.time()))


@pytest.mark.parametrize("nproc,sig,code,group", [
    (1, signal.SIGTERM, 0, False),
    (1, signal.SIGINT, 130, False),
    pytest.param(2, signal.SIGINT, 130, True, marks=pytest.mark.slow),  # Ctrl-C to the launcher's group
    pytest.param(2, signal.SIGTERM, 0, False, marks=pytest.mark.slow),
])
def test_signal_saves_current_step_and_exits(tmp_path, nproc, sig, code, group):
    out = tmp_path / "run"
    proc = Proc(_train(out, 100_000, nproc=nproc, checkpoint_every=100_000), new_session=group)
    proc.wait_for(lambda: (out / "loss.csv").exists() and len((out / "loss.csv").read_text().splitlines()) > 1)
    (os.killpg if group else os.kill)(proc.p.pid, sig)
    assert proc.finish(120) == code, proc.output
    line = next(x for x in proc.lines if x.startswith("stopped by a signal: step "))
    step = int(line.split()[5])
    _, meta = latest_checkpoint(out / "checkpoints")
    assert meta["step"] == step > 0 and meta["world_size"] == nproc
    assert _log(out)[-1][0] == str(step)
    assert not (out / "samples" / "final.png").exists()  # a signal asks for a quick exit
    assert "Traceback" not in proc.output


def test_corrupt_newest_checkpoint_is_a_clear_error_naming_the_good_one(tmp_path):
    for step in (5, 10):
        save_checkpoint(tmp_path, step, {"w": torch.full((64,), float(step))}, {})
    st = tmp_path / "step-0000010.safetensors"
    data = bytearray(st.read_bytes())
    data[-3] ^= 0xFF
    st.write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as err:
        latest_checkpoint(tmp_path)
    msg = str(err.value)
    assert "corrupt" in msg and "step-0000005" in msg and "\n" not in msg
    assert not verify_checkpoint(tmp_path / "step-0000010.json") and verify_checkpoint(tmp_path / "step-0000005.json")


def test_next_save_removes_leftovers_of_a_killed_writer(tmp_path):
    save_checkpoint(tmp_path, 5, {"w": torch.ones(4)}, {})
    (tmp_path / "step-0000007.safetensors").write_bytes(b"renamed, but killed before its JSON")
    (tmp_path / ".step-0000008.safetensors.tmp").write_bytes(b"killed while writing")
    assert latest_checkpoint(tmp_path)[1]["step"] == 5  # neither is ever read
    save_checkpoint(tmp_path, 10, {"w": torch.zeros(4)}, {})
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "step-0000005.json", "step-0000005.safetensors", "step-0000010.json", "step-0000010.safetensors"]


@pytest.mark.parametrize("sigs,code", [([signal.SIGTERM], 0),
                                       pytest.param([signal.SIGINT, signal.SIGINT], 130, marks=pytest.mark.slow)])
def test_signal_during_the_final_save_completes_it(tmp_path, sigs, code):
    """The only checkpoint of a run is the final one: a signal (even a repeated Ctrl-C) while it is written
    must not lose the run; the handlers stay until the end."""
    out, folder = tmp_path / "run", tmp_path / "run" / "checkpoints"
    proc = Proc(_train(out, 6, checkpoint_every=1000), slow_checkpoint=0.5)
    proc.wait_for(lambda: folder.is_dir() and any(folder.glob(".step-*.safetensors.*.tmp")))
    for s in sigs:
        os.kill(proc.p.pid, s)
    assert proc.finish(120) == code, proc.output
    assert _assert_disk_sound(folder) == [6] and "Traceback" not in proc.output
    assert "stopped by a signal: step 6" in proc.output


@pytest.mark.slow
def test_signal_during_the_final_grid_ends_cleanly(tmp_path):
    out = tmp_path / "run"
    # a continuous process: 400 sampler steps are 400 network calls (a discrete one stops at T)
    proc = Proc(_train(out, 4, checkpoint_every=1000, sample_steps=400, process="vp"))
    proc.wait_for(lambda: (out / "checkpoints" / "step-0000004.json").exists())
    time.sleep(0.3)
    os.kill(proc.p.pid, signal.SIGINT)
    assert proc.finish(120) == 130, proc.output
    assert _assert_disk_sound(out / "checkpoints") == [4] and "Traceback" not in proc.output
    assert "stopped by a signal: step 4" in proc.output and not list((out / "samples").glob(".*"))
    assert not (out / ".lock").exists()
