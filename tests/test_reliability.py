"""Bad input and faults, tried as a hostile but realistic user would: every case ends in exit code 2 (1 for a
diverged run) with one line on stderr, and every file that existed before is byte-identical afterwards.

Most cases call ``difflab.cli.main`` in-process on copies of one tiny run made once per module; the property
test draws flags from a table of bad values with hypothesis."""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import socket
import subprocess
import time
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from safetensors.torch import load_file, save_file

from difflab.cli import main
from difflab.errors import CheckpointError, UsageError
from difflab.files import atomic_write, check_output, temp_path
from difflab.runs import lock as runlock
from difflab.runs.checkpoint import list_checkpoints, sha256_file, verify_checkpoint

TINY = ["--data", "digits", "--model", "tiny", "--batch-size", "8", "--log-every", "1", "--checkpoint-every", "2",
        "--sample-every", "0", "--sample-steps", "1", "--warmup", "1", "--quiet"]


def cli(*args: str) -> tuple[int, str]:
    """(exit code, stderr) of ``difflab ARGS`` run in this process."""
    err = io.StringIO()
    with redirect_stderr(err), redirect_stdout(io.StringIO()):
        try:
            rc = main([str(a) for a in args])
        except SystemExit as e:  # argparse
            rc = int(e.code or 0)
    return rc, err.getvalue()


def files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def assert_refused(root: Path, *args: str, code: int = 2, match: str = "") -> str:
    """The command exits with ``code`` and one error line, and leaves every file under ``root`` as it was."""
    before = files(root)
    rc, err = cli(*args)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == code, (args, rc, err)
    assert "Traceback" not in err and len(lines) == 1, err
    assert match in lines[0], lines[0]
    after = files(root)
    assert {k: v for k, v in after.items() if k in before} == before, f"a file changed: {args}"
    return lines[0]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("tiny")
    rc, err = cli("train", *TINY, "--steps", "2", "--out", root / "run")
    assert rc == 0, err
    return root / "run"


@pytest.fixture
def run_copy(tiny_run, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(tiny_run, dst)
    return dst


# --- flags ---------------------------------------------------------------------------------------------------
TRAIN_BAD = {
    "--time-limit": ["nan", "inf", "-1"], "--warmup": ["-5"], "--steps": ["0", "-3"], "--lr": ["nan", "-1e-3", "2"],
    "--dropout": ["2", "nan", "-0.5"], "--channels-mult": ["0,0", "a,b", "-4", "4," * 9 + "4"],
    "--device": ["tpu", "cuda:x"], "--seed": ["-1", str(10**30)], "--weight-decay": ["-1", "nan"],
    "--grad-clip": ["inf", "-1"], "--ema-decay": ["1", "nan"], "--cond-drop": ["1.5"], "--gamma": ["1", "0"],
    "--batch-size": ["0", str(10**12)], "--image-size": ["-8", str(10**6)], "--keep": ["0"], "--T": ["0"],
    "--sample-steps": ["0"], "--log-every": ["0"], "--image-channels": ["2"], "--out": [" "],
}
SAMPLE_BAD = {
    "--guidance": ["nan", "inf"], "--eta": ["nan", "-1", "2"], "--churn": ["-5", "nan"], "--steps": ["0", "-1"],
    "--n": ["0", str(10**12)], "--batch-size": ["0"], "--seed": ["-1", str(2**63)], "--nrow": ["0"],
    "--classifier-scale": ["nan"], "--classifier-sigma-max": ["0", "nan"], "--device": ["tpu"],
}
N_TRAIN_BAD = sum(map(len, TRAIN_BAD.values()))
N_SAMPLE_BAD = sum(map(len, SAMPLE_BAD.values()))


@pytest.mark.parametrize("flag,value", [(f, v) for f, vs in TRAIN_BAD.items() for v in vs])
def test_bad_train_flag_is_one_line(tmp_path, flag, value):
    out = tmp_path / "out"
    assert_refused(tmp_path, "train", *TINY, "--steps", "2", "--out", out, flag, value)
    assert not out.exists()  # refused before anything was written


@given(st.lists(st.sampled_from([(f, v) for f, vs in SAMPLE_BAD.items() for v in vs]), min_size=1, max_size=3,
                unique_by=lambda fv: fv[0]))
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_fuzz_bad_sample_flags(tiny_run, flags):
    assert_refused(tiny_run, "sample", "--run", tiny_run, *[a for fv in flags for a in fv])


def test_sample_works_and_default_grid_is_replaced(tiny_run, tmp_path):
    for _ in range(2):  # the default name under RUN/samples is difflab's own
        assert cli("sample", "--run", tiny_run, "--n", "2", "--steps", "1")[0] == 0
    shutil.rmtree(tiny_run / "samples")
    (tiny_run / "samples").mkdir()


# --- outputs ---------------------------------------------------------------------------------------------------
def test_outputs_never_replace_foreign_or_run_files(run_copy, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes")
    newest = list_checkpoints(run_copy / "checkpoints")[-1].with_suffix(".safetensors")
    (tmp_path / "link.png").symlink_to(run_copy / "config.json")
    base = ["sample", "--run", run_copy, "--n", "2", "--steps", "1"]
    cases = [
        (["--out", notes], "already exists"),
        (["--out", run_copy / "config.json", "--force"], "run folder"),
        (["--save-npz", newest, "--force"], "run folder"),
        (["--out", tmp_path / "link.png", "--force"], "run folder"),  # a symlink is judged by its target
        (["--out", run_copy / "samples" / "final.png", "--force"], "run folder"),
        (["--out", tmp_path], "is a folder"),
        (["--out", tmp_path / ("x" * 300 + ".png")], "too long"),
        (["--out", notes / "grid.png"], "not a folder"),
    ]
    for extra, match in cases:
        assert_refused(tmp_path, *base, *extra, match=match)
    assert cli(*base, "--out", notes, "--force")[0] == 0  # overwriting on purpose
    assert notes.read_bytes()[:4] == b"\x89PNG"


def test_train_into_someone_elses_folder_is_refused(tmp_path):
    out = tmp_path / "theirs"
    out.mkdir()
    (out / "config.json").write_text('{"their": "settings"}')
    (out / "loss.csv").write_text("a,b\n1,2\n")
    assert_refused(tmp_path, "train", *TINY, "--steps", "2", "--out", out, match="not a difflab run")
    (out / "config.json").unlink()
    (out / "notes.md").write_text("mine")
    assert_refused(tmp_path, "train", *TINY, "--steps", "2", "--out", out, match="not a difflab run")
    (tmp_path / "afile").write_text("x")
    assert_refused(tmp_path, "train", *TINY, "--steps", "2", "--out", tmp_path / "afile", match="is a file")


def test_atomic_write_fits_long_names_and_cleans_up(tmp_path):
    long = tmp_path / ("n" * 250 + ".png")
    assert len(temp_path(long).name) <= 255
    atomic_write(long, lambda tmp: tmp.write_bytes(b"ok"))
    assert long.read_bytes() == b"ok"

    def fail(tmp: Path) -> None:
        tmp.write_bytes(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(UsageError, match="No space left"):
        atomic_write(tmp_path / "full.bin", fail)
    assert sorted(p.name for p in tmp_path.iterdir()) == [long.name]


def test_atomic_write_syncs_unless_told_not_to(tmp_path, monkeypatch):
    import os

    synced = []
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd))
    atomic_write(tmp_path / "a.bin", lambda tmp: tmp.write_bytes(b"a"))
    assert len(synced) >= 1  # the file (and, where the file system allows, its folder)
    synced.clear()
    atomic_write(tmp_path / "b.bin", lambda tmp: tmp.write_bytes(b"b"), durable=False)
    assert synced == [] and (tmp_path / "b.bin").read_bytes() == b"b"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "b.bin"]  # no temporary file left


def test_disk_full_while_saving_keeps_last_good_checkpoint(run_copy, monkeypatch):
    from difflab.runs import checkpoint

    def full(tmp, tensors, header=None):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "_write_tensors", full)
    # (the log rows of steps 3-4 are kept: the next resume drops rows past its checkpoint)
    line = assert_refused(run_copy / "checkpoints", "train", *TINY, "--steps", "4", "--out", run_copy, "--resume",
                          match="No space left on device")
    assert "step-0000002" in line and verify_checkpoint(list_checkpoints(run_copy / "checkpoints")[-1])


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_folder(tmp_path, tiny_run):
    ro = tmp_path / "ro"
    ro.mkdir(0o555)
    assert_refused(tmp_path, "sample", "--run", tiny_run, "--out", ro / "g.png", match="not writable")


# --- run-folder damage -----------------------------------------------------------------------------------------
def _edit_json(path: Path, **changes) -> None:
    d = json.loads(path.read_text())
    d.update(changes)
    path.write_text(json.dumps(d))


def _damage(run: Path, how: str) -> None:
    newest = list_checkpoints(run / "checkpoints")[-1]
    if how.startswith("config:"):
        key, value = how[7:].split("=")
        _edit_json(run / "config.json", **{key: json.loads(value)})
    elif how == "config-not-object":
        (run / "config.json").write_text("[1, 2]")
    elif how == "config-binary":
        (run / "config.json").write_bytes(b"\xff\xfe\x00garbage")
    elif how.startswith("ckpt:"):
        key, value = how[5:].split("=")
        _edit_json(newest, **{key: json.loads(value)})
    elif how == "ckpt-not-object":
        newest.write_text('"hello"')
    elif how == "missing-opt-tensor":
        st = newest.with_suffix(".safetensors")
        tensors = load_file(str(st))
        del tensors[next(k for k in tensors if k.startswith("opt.") and k.endswith("exp_avg"))]
        save_file(tensors, str(st))
        _edit_json(newest, sha256=sha256_file(st))
    elif how == "loss-csv":
        (run / "loss.csv").write_text("step,loss\nabc,def\n")
    elif how == "loss-csv-empty":
        (run / "loss.csv").write_text("")
    elif how == "network-edited":  # config.json says another shape than the checkpoint
        _edit_json(run / "config.json", image_size=16)


DAMAGE = ["config:steps=null", 'config:lr="fast"', "config:warmup=-5", "config:hflip=3", "config:T=1.5",
          "config-not-object", "config-binary", 'ckpt:tensors=".."', 'ckpt:tensors="../config.json"', "ckpt:step=null",
          'ckpt:sha256=5', "ckpt-not-object", "missing-opt-tensor", "loss-csv", "loss-csv-empty", "network-edited"]
SAMPLED_DAMAGE = {"config:steps=null", 'ckpt:tensors=".."', 'ckpt:tensors="../config.json"', "ckpt-not-object",
                  "network-edited", "config-binary"}


@pytest.mark.parametrize("how", DAMAGE)
def test_damaged_run_folder_is_one_line_on_resume(run_copy, how):
    _damage(run_copy, how)
    assert_refused(run_copy, "train", *TINY, "--steps", "4", "--out", run_copy, "--resume")
    if how in SAMPLED_DAMAGE:
        assert_refused(run_copy, "sample", "--run", run_copy, "--n", "2", "--steps", "1")


def test_second_writer_is_refused_and_stale_locks_are_taken_over(run_copy, monkeypatch):
    lock = run_copy / runlock.NAME
    holder = subprocess.Popen(["sleep", "60"])
    try:
        info = {"host": socket.gethostname(), "pid": holder.pid, "started": runlock._start_time(holder.pid),
                "token": "live", "since": "now"}
        lock.write_text(json.dumps(info))
        line = assert_refused(run_copy, "train", *TINY, "--steps", "4", "--out", run_copy, "--resume",
                              match="in use by")
        assert str(holder.pid) in line
    finally:
        holder.kill()
        holder.wait()
    # the holder died: taken over; a lock of another host is taken over only when its heartbeat stopped
    assert runlock._is_stale(lock, json.loads(lock.read_text()))
    lock.write_text(json.dumps({**info, "host": "node-that-died"}))
    with pytest.raises(runlock.RunLocked):
        runlock.acquire(run_copy)
    old = time.time() - runlock.stale_after() - 5
    os.utime(lock, (old, old))
    taken = runlock.acquire(run_copy)
    assert json.loads(lock.read_text())["token"] == taken.token
    with pytest.raises(runlock.RunLocked):  # held by this process: a second writer here is refused too
        runlock.acquire(run_copy)
    taken.release()
    assert not lock.exists()
    rc, err = cli("train", *TINY, "--steps", "4", "--out", run_copy, "--resume")
    assert rc == 0 and not lock.exists(), err


# --- divergence ------------------------------------------------------------------------------------------------
def test_divergence_keeps_only_finite_checkpoints(tmp_path):
    out = tmp_path / "run"
    rc, _ = cli("train", *TINY, "--steps", "2", "--out", out)
    assert rc == 0
    line = assert_refused(out, "train", *TINY, "--steps", "6", "--out", out, "--resume", "--weight-decay", "1e45",
                          "--warmup", "0", code=2, match="differs")  # a resumed run keeps its optimiser settings
    rc, err = cli("train", *TINY, "--steps", "6", "--out", tmp_path / "blow", "--weight-decay", "1e45",
                  "--warmup", "0", "--checkpoint-every", "1")
    assert rc == 1 and "NaN or infinite" in err and "no checkpoint was written yet" in err, (line, err)
    assert not list_checkpoints(tmp_path / "blow" / "checkpoints")


# --- data ------------------------------------------------------------------------------------------------------
def test_data_folder_oddities_are_left_out(tmp_path):
    from difflab.data.folder import load_folder

    root = tmp_path / "imgs"
    root.mkdir()
    outside = tmp_path / "secret.png"
    for name in ("a.png", "b.png"):
        Image.fromarray(np.full((8, 8), 40, np.uint8)).save(root / name)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(outside)
    os.mkfifo(root / "x.png")  # would block forever when opened
    (root / "dangling.png").symlink_to(tmp_path / "missing.png")
    (root / "loop.png").symlink_to(root / "loop.png")
    (root / "out.png").symlink_to(outside)
    (root / "in.png").symlink_to(root / "a.png")
    with pytest.warns(UserWarning, match="left out 4"):
        data = load_folder(root, cache_dir=tmp_path / "cache")
    assert len(data) == 3  # a, b and the link inside the folder


def test_data_folder_of_only_oddities_is_one_line(tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    os.mkfifo(root / "x.png")
    assert_refused(tmp_path, "train", *TINY, "--data", root, "--steps", "2", "--out", tmp_path / "o",
                   match="no images")


def test_every_builtin_small_dataset_trains_with_the_default_network(tmp_path):
    rc, err = cli("train", "--data", "digits", "--steps", "1", "--sample-steps", "1", "--quiet", "--out",
                  tmp_path / "d")
    assert rc == 0, err


@pytest.mark.parametrize("noise", ["nan", "shape", "int", "pickle", "npz"])
def test_init_noise_is_checked(tiny_run, tmp_path, noise):
    path = tmp_path / "noise.npy"
    arr = np.zeros((2, 1, 8, 8), np.float32)
    if noise == "nan":
        arr[:] = np.nan
    elif noise == "shape":
        arr = np.zeros((2, 3, 16, 16), np.float32)
    elif noise == "int":
        arr = arr.astype(np.int64)
    if noise == "pickle":
        np.save(path, np.array([object()], dtype=object), allow_pickle=True)
    elif noise == "npz":
        np.savez(path, a=arr)
        path = path.with_suffix(".npy.npz")
    else:
        np.save(path, arr)
    assert_refused(tmp_path, "sample", "--run", tiny_run, "--n", "2", "--steps", "1", "--init-noise", path,
                   "--out", tmp_path / "g.png")


def test_evaluate_samples_file_is_checked(tmp_path):
    bad = {"labels-2d": {"images": np.zeros((4, 8, 8, 1), np.uint8), "labels": np.zeros((4, 2), np.int64)},
           "float": {"images": np.zeros((4, 8, 8, 1), np.float32)},
           "channels": {"images": np.zeros((4, 8, 8, 5), np.uint8)}}
    for name, arrays in bad.items():
        np.savez(tmp_path / f"{name}.npz", **arrays)
        assert_refused(tmp_path, "evaluate", "--samples", tmp_path / f"{name}.npz", "--data", "digits")


# --- no code from data -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("protocol", [2, 4])
def test_mnist_reader_refuses_object_arrays(protocol):
    from difflab.data.mnist import ArrayUnpickler

    evil = np.array([1, "x"], dtype=object)
    good = np.zeros(3, np.float32)
    with pytest.raises(pickle.UnpicklingError):
        ArrayUnpickler(io.BytesIO(pickle.dumps(((evil, good),) * 3, protocol=protocol)), encoding="latin1").load()
    if protocol < 3:  # Python 3 writes protocol-2 bytes through _codecs.encode: refused as well
        return
    back = ArrayUnpickler(io.BytesIO(pickle.dumps(((good, good),) * 3, protocol=protocol))).load()
    assert np.array_equal(back[0][0], good) and type(back[0][0]) is not np.ndarray  # the checked subclass


def test_planted_kernel_is_never_loaded(tmp_path, monkeypatch):
    from difflab.nets import cpu_kernels

    compiler = cpu_kernels._compiler()
    if compiler is None:
        pytest.skip("no C++ compiler")
    monkeypatch.setenv("DIFFLAB_CACHE", str(tmp_path / "cache"))
    target = cpu_kernels._build(compiler)  # builds and records the digest
    real = target.read_bytes()
    target.write_bytes(b"\x7fELF planted")  # same predictable name, other content
    assert cpu_kernels._build(compiler).read_bytes() == real  # rebuilt, the planted file replaced
    os.chmod(target.parent, 0o777)
    with pytest.raises(RuntimeError, match="writable by other users"):
        cpu_kernels._build(compiler)


def test_diffusers_bin_weights_are_not_unpickled(tmp_path):
    pytest.importorskip("diffusers")
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel", "sample_size": 8}))
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    (folder / "diffusion_pytorch_model.bin").write_bytes(pickle.dumps(Evil()))
    assert_refused(tmp_path, "sample", "--diffusers-model", folder, "--out", tmp_path / "g.png", match="safetensors")
    assert not marker.exists()


def test_check_output_rules(tmp_path, tiny_run):
    assert check_output(tmp_path / "new.png", "--out") == (tmp_path / "new.png").resolve()
    assert check_output(tiny_run / "samples" / "mine.png", "--out")  # a new picture beside the run's grids
    for path in (tiny_run / "loss.csv", tiny_run / "checkpoints" / "x.json", tiny_run / "samples" / "step-1.png"):
        with pytest.raises(UsageError, match="run folder"):
            check_output(path, "--out", force=True)


def test_checkpoint_meta_paths_are_confined(tmp_path):
    from difflab.runs.checkpoint import load_checkpoint, save_checkpoint

    js = save_checkpoint(tmp_path, 1, {"w": torch.ones(2)}, {})
    for tensors in ("..", "/etc/passwd", "step-0000002.safetensors"):
        _edit_json(js, tensors=tensors)
        with pytest.raises(CheckpointError, match="damaged"):
            load_checkpoint(js)


def test_non_finite_checkpoint_is_never_written(tmp_path):
    from difflab.runs.checkpoint import non_finite

    assert non_finite({"a": torch.ones(2), "b": torch.tensor([1.0, float("inf")]), "c": torch.arange(3)}) == ["b"]
