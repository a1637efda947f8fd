"""Exports and full disks: ``difflab export`` refuses a run's own folder, writes its folder beside and renames it
into place (a failed or killed export leaves nothing that blocks the retry; of two exports into one new folder
only one succeeds), and a full disk met by any tensor write (safetensors raises its own error type, not an
OSError) is one line with no partial output."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_export import _train
from test_reliability import TINY, assert_refused, cli, files

from difflab.errors import UsageError
from difflab.files import OutputError, atomic_folder, atomic_write
from difflab.runs.checkpoint import list_checkpoints, verify_checkpoint

diffusers = pytest.importorskip("diffusers")
from safetensors import SafetensorError  # noqa: E402

FULL = 'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'


def _full(*args, **kwargs):
    raise SafetensorError(FULL)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("exp") / "run")


def _export(run: Path, out: Path) -> tuple:
    return ("export", "--run", run, "--to", "diffusers", out)


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


@pytest.mark.parametrize("inside", ["exp", "samples/hub", "checkpoints/hub", ".", "ema/x/y"])
def test_export_into_the_run_folder_is_refused(run, inside):
    target = run / inside
    existed = target.exists()
    assert_refused(run, *_export(run, target), match="--to diffusers")
    assert target.exists() == existed and not _leftovers(target.parent if target.parent.exists() else run)


def test_full_disk_during_export_leaves_nothing_and_the_retry_works(run, tmp_path, monkeypatch):
    import safetensors.torch

    out = tmp_path / "hub"
    with monkeypatch.context() as m:
        m.setattr(safetensors.torch, "save_file", _full)
        line = assert_refused(tmp_path, *_export(run, out), match="No space left on device")
    assert str(out) in line and not out.exists() and not _leftovers(tmp_path)
    (tmp_path / ".hub.0badc0de.tmp").mkdir()  # what a SIGKILLed export leaves beside: it blocks nothing
    (tmp_path / ".hub.0badc0de.tmp" / "model_index.json").write_text("{")
    rc, err = cli(*_export(run, out))
    assert rc == 0, err
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").is_file() and (out / "README.md").is_file()
    assert _leftovers(tmp_path) == [".hub.0badc0de.tmp"]


def test_of_two_writers_of_one_new_folder_only_one_succeeds(tmp_path):
    out = tmp_path / "hub"

    def second(folder: Path) -> None:
        (folder / "a").write_text("second")

    def first(folder: Path) -> None:
        (folder / "a").write_text("first")
        atomic_folder(out, second)  # finishes while the first is still writing

    with pytest.raises(OutputError, match="meanwhile"):
        atomic_folder(out, first)
    assert (out / "a").read_text() == "second" and not _leftovers(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    atomic_folder(empty, second)  # an empty folder is replaced
    assert (empty / "a").read_text() == "second"


def test_full_disk_inside_safetensors_is_one_line(tmp_path):
    with pytest.raises(OutputError) as e:
        atomic_write(tmp_path / "x.safetensors", _full)
    assert str(e.value) == f"cannot write {tmp_path / 'x.safetensors'}: No space left on device"
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def snap_run(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("snaps")
    rc, err = cli("train", *TINY, "--steps", "2", "--ema-snapshot-every", "1", "--out", root / "run")
    assert rc == 0, err
    return root / "run"


def test_full_disk_in_checkpoints_and_posthoc_ema_is_one_line(snap_run, tmp_path, monkeypatch):
    from difflab.runs import checkpoint

    run = tmp_path / "run"
    shutil.copytree(snap_run, run)
    monkeypatch.setattr(checkpoint, "save_file", _full)
    snapshots = files(run / "ema-snapshots")
    line = assert_refused(run / "checkpoints", "train", *TINY, "--steps", "4", "--ema-snapshot-every", "1", "--out", run,
                          "--resume", match="No space left on device")
    assert "ema-snapshots" in line and verify_checkpoint(list_checkpoints(run / "checkpoints")[-1])
    assert files(run / "ema-snapshots") == snapshots  # (the config and log of a resumed run may change)
    assert not [p for p in run.rglob("*") if p.name.endswith(".tmp")]
    assert_refused(run, "ema", "--run", run, "--ema-length", "0.08", match="No space left on device")
    assert not [p for p in (run / "ema").rglob("*") if p.is_file()]


def test_full_disk_while_writing_the_json_removes_the_tensor_file(tmp_path, monkeypatch):
    import torch

    from difflab.runs import checkpoint

    def full_json(path, text):
        raise OutputError(f"cannot write {path}: No space left on device")

    monkeypatch.setattr(checkpoint, "write_text", full_json)
    with pytest.raises(OutputError):
        checkpoint.save_checkpoint(tmp_path, 1, {"w": torch.ones(2)}, {})
    assert list(tmp_path.iterdir()) == []


_NAMES = st.sampled_from(["exp", "samples/x", "checkpoints", "config.json", "loss.csv", "../run/exp", "a" * 300,
                          "new/deeper", "ok"])


@given(_NAMES, st.booleans())
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_fuzz_export_targets(run, tmp_path_factory, name, inside_run):
    """Any target: refused with one line and no file changed, or a complete folder outside the run."""
    base = run if inside_run else tmp_path_factory.mktemp("out")
    target = base / name
    before = files(run)
    rc, err = cli(*_export(run, target))
    assert files(run) == before
    if rc != 0:
        assert rc == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
        return
    assert not inside_run and (target / "model_index.json").is_file()
    from difflab.interop.export import export_diffusers

    with pytest.raises(UsageError, match="already exists"):  # a second export into the same folder never succeeds
        export_diffusers(run, target)
