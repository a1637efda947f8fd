"""The notebook user (issue 24, step 6): ``difflab.train`` shows its progress and takes images in memory."""

from __future__ import annotations

import io
import json
from contextlib import redirect_stderr, redirect_stdout

import numpy as np
import pytest
import torch
from PIL import Image

import difflab
from difflab.cli import main
from difflab.data import load
from difflab.data.memory import from_memory
from difflab.errors import UsageError

TINY = {"model": "tiny", "batch_size": 8, "log_every": 1, "checkpoint_every": 2, "sample_every": 0,
        "sample_steps": 2, "warmup": 1}


@pytest.fixture(scope="module")
def digits():
    data = load("digits")
    return data.images[:64].clone(), data.labels[:64].clone()


@pytest.fixture(scope="module")
def run(tmp_path_factory, digits, one_thread):
    """A class-conditional run on a uint8 tensor and its labels, 2 steps."""
    images, labels = digits
    out = tmp_path_factory.mktemp("nb") / "run"
    return difflab.train(data=images, labels=labels, conditioning="class", steps=2, out=out, progress=False, **TINY)


def test_progress_is_on_by_default_with_step_loss_speed_and_time_left(tmp_path, capsys, digits, one_thread):
    difflab.train(data="digits", steps=3, out=tmp_path / "run", **TINY)
    out, err = capsys.readouterr()
    final = err.rstrip().split("\r")[-1]  # the bar redraws itself in place
    assert final.startswith("100%") and " 3/3 [" in final, final
    assert "<00:00" in final and "step/s" in final  # elapsed<left
    assert " | " in final and "img/s" in final and "loss " in final
    loss = float(final.split("loss ")[1].split()[0])
    assert 0 < loss < 10
    assert out.startswith("difflab: gaussian on digits")  # the run's description, as the CLI prints it


def test_progress_false_is_silent(tmp_path, capsys, one_thread):
    difflab.train(data="digits", steps=1, out=tmp_path / "run", progress=False, **TINY)
    assert capsys.readouterr() == ("", "")


def test_every_kind_of_images_gives_the_same_data(digits):
    u8, labels = digits  # uint8 [64, 1, 8, 8]
    ref = from_memory(u8, labels)
    assert ref.name == f"in-memory:{ref.fingerprint}" and ref.class_names == [str(k) for k in range(10)]
    hwc = u8.permute(0, 2, 3, 1).numpy()
    kinds = {"NCHW tensor": u8, "NHWC array": hwc, "NHW array": u8[:, 0].numpy(),
             "int64 tensor": u8.long(), "float [0, 1]": u8.float() / 255,
             "float [-1, 1] array": u8.numpy().astype(np.float32) / 127.5 - 1,
             "float64 tensor [0, 1]": u8.double() / 255, "PIL list": [Image.fromarray(a[:, :, 0]) for a in hwc],
             "PIL tuple": tuple(Image.fromarray(a[:, :, 0]) for a in hwc)}
    for kind, images in kinds.items():
        got = from_memory(images, labels.tolist())
        assert torch.equal(got.images, ref.images) and got.fingerprint == ref.fingerprint, kind
    colour = u8.expand(-1, 3, -1, -1).contiguous()
    rgb = [Image.fromarray(a) for a in colour.permute(0, 2, 3, 1).numpy()]
    assert torch.equal(from_memory(rgb).images, colour) and from_memory(colour.numpy()).shape == (3, 8, 8)
    rgba = Image.new("RGBA", (8, 8), (0, 0, 0, 0))  # transparency onto white, as a folder's
    assert from_memory([rgba, Image.new("RGB", (8, 8))]).images[0].unique().tolist() == [255]
    assert from_memory(u8[:, :, :6, :6]).shape == (1, 6, 6)
    assert from_memory(u8[:, :, :6, :6], multiple=8).shape == (1, 8, 8)  # train()'s rule: up to a multiple of 8
    assert from_memory(u8, image_size=4, channels=3).shape == (3, 4, 4)
    assert from_memory(u8).labels is None and from_memory(u8).fingerprint != ref.fingerprint  # labels count


@pytest.mark.parametrize("images, labels, message", [
    (torch.full((2, 1, 8, 8), float("nan")), None, "images hold NaN or infinite values"),
    (np.full((2, 8, 8), np.inf, dtype=np.float32), None, "images hold NaN or infinite values"),
    (torch.zeros(8, 8), None, "images must be [N, H, W], [N, C, H, W] or [N, H, W, C], got 2 dimensions [8, 8]"),
    (torch.zeros(1, 2, 1, 8, 8), None, "got 5 dimensions"),
    (torch.zeros(2, 2, 8, 8), None, "images need 1 (gray) or 3 (RGB) channels, got [2, 2, 8, 8]"),
    (np.zeros((2, 8, 8, 4), np.uint8), None, "images need 1 (gray) or 3 (RGB) channels"),
    (torch.zeros(0, 1, 8, 8), None, "data= holds no images"),
    ([], None, "data= holds no images (an empty list)"),
    (torch.zeros(2, 3, 8, 3), None, "are ambiguous"),
    (torch.zeros(2, 1, 8, 6), None, "images must be square, got 8x6"),
    (torch.full((2, 1, 8, 8), 255.0), None, "float images must be in [0, 1] or [-1, 1], got values from 255 to 255"),
    (torch.full((2, 1, 8, 8), 256), None, "integer images must be pixels 0..255, got values from 256 to 256"),
    (torch.zeros(2, 1, 8, 8, dtype=torch.bool), None, "images must be integers 0..255 or floats"),
    ([np.zeros((8, 8))], None, "a list given as data= must hold PIL images, got a ndarray"),
    ([Image.new("L", (8, 8)), Image.new("L", (9, 9))], None, "the PIL images must all be one size, got 8x8 and 9x9"),
    (torch.zeros(2, 1, 8, 8, dtype=torch.uint8), [0], "labels must be one whole number per image (2), got int64 [1]"),
    (torch.zeros(2, 1, 8, 8, dtype=torch.uint8), [0.0, 1.0], "labels must be one whole number per image"),
    (torch.zeros(2, 1, 8, 8, dtype=torch.uint8), [0, -1], "labels must be class numbers >= 0, got -1"),
])
def test_bad_images_are_one_line(tmp_path, images, labels, message):
    with pytest.raises(UsageError) as caught:
        difflab.train(data=images, labels=labels, steps=1, out=tmp_path / "run", progress=False, **TINY)
    assert message in str(caught.value) and "\n" not in str(caught.value)
    assert not (tmp_path / "run").exists()


def test_settings_a_run_on_images_in_memory_cannot_have(tmp_path):
    images = torch.zeros(4, 1, 8, 8, dtype=torch.uint8)
    for settings, message in [({"method": "cold"}, "samples from its training images"),
                              ({"crop": 0.25}, "crop decodes the images larger"),
                              ({"data": "digits", "labels": [0, 1]}, "labels= as a list of classes goes with images"),
                              ({"data": {"a": 1}}, "data= takes a dataset name, a folder, or images (a tensor, "
                                                   "numpy array or list of PIL images), got dict")]:
        with pytest.raises(UsageError) as caught:
            difflab.train(**{"data": images, **settings, "steps": 1, "out": tmp_path / "run", "progress": False})
        assert message in str(caught.value), (settings, str(caught.value))
        assert "\n" not in str(caught.value)


def test_a_run_on_a_tensor_records_it_and_samples_without_it(run, digits, tmp_path):
    images, labels = digits
    fp = from_memory(images, labels).fingerprint
    cfg = json.loads((run.path / "config.json").read_text())
    assert cfg["data"] == f"in-memory:{fp}" and run.run.class_names == [str(k) for k in range(10)]
    meta = sorted((run.path / "checkpoints").glob("*.json"))[-1]
    assert json.loads(meta.read_text())["data_fingerprint"] == fp
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        rc = main(["sample", "--run", str(run.path), "--n", "4", "--seed", "1", "--steps", "2", "--class", "3",
                   "--save-npz", str(tmp_path / "s.npz"), "--out", str(tmp_path / "g.png")])
    assert rc == 0, err.getvalue()
    drawn = torch.from_numpy(np.load(tmp_path / "s.npz")["images"]).permute(0, 3, 1, 2)
    assert torch.equal(drawn, run.sample(4, seed=1, steps=2, labels=3))


def test_resuming_needs_the_same_images(run, digits, capsys):
    images, labels = digits
    settings = {**TINY, "conditioning": "class", "out": run.path, "resume": True, "progress": False}
    other = images.clone()
    other[0, 0, 0, 0] ^= 1
    for data, lab, message in [(other, labels, "these images (in-memory:"), (images, labels.flip(0), "are not the ones"),
                               (None, None, "trained on images given in memory (in-memory:")]:
        given = {} if data is None else {"data": data, "labels": lab}
        with pytest.raises(UsageError) as caught:
            difflab.train(**given, **settings, steps=4)
        assert message in str(caught.value) and "\n" not in str(caught.value)
    # the same pixels in another form resume the run (the numpy array of the same images, labels as a list)
    model = difflab.train(data=images.numpy(), labels=labels.tolist(), **settings, steps=4)
    assert model.run.step == 4
    assert capsys.readouterr() == ("", "")


@pytest.fixture(scope="module")
def unet_run(tmp_path_factory, one_thread):
    """A 2-step run with a diffusers twin (the tiny preset has none)."""
    out = tmp_path_factory.mktemp("nb") / "unet"
    return difflab.train(data="digits", steps=2, out=out, progress=False,
                         **{**TINY, "model": "mnist-small", "channels_mult": "32,64"})


def test_save_pretrained_as_a_run_folder_samples_the_same(unet_run, tmp_path):
    path = unet_run.save_pretrained(tmp_path / "copy")
    assert path == tmp_path / "copy"
    assert sorted(str(p.relative_to(path)) for p in path.rglob("*")) == [
        "checkpoints", "checkpoints/step-0000002.json", "checkpoints/step-0000002.safetensors", "config.json",
        "grid-bottom.json", "loss.csv", "loss.png", "samples", "samples/final.png"]
    copy = difflab.load(path)
    assert copy.run.step == 2 and torch.equal(copy.sample(6, seed=1, steps=3), unet_run.sample(6, seed=1, steps=3))
    assert not list(tmp_path.glob(".*.tmp"))


def test_save_pretrained_as_diffusers_samples_the_same(unet_run, tmp_path):
    path = unet_run.save_pretrained(tmp_path / "hub", format="diffusers")
    assert (path / "unet" / "diffusion_pytorch_model.safetensors").is_file() and (path / "README.md").is_file()
    hub = difflab.load(path)
    assert hub.run is None
    same = {"sampler": "ddim", "steps": 10, "spacing": "uniform", "clip": "none"}  # difflab's grid, as the run's
    diff = (hub.sample(6, seed=1, **same).int() - unet_run.sample(6, seed=1, **same).int()).abs()
    assert int(diff.max()) <= 1  # (the tolerance of test_export: float rounding in another UNet)
    again = hub.save_pretrained(tmp_path / "hub2", format="diffusers")  # a diffusers folder is copied as it is
    assert torch.equal(difflab.load(again).sample(2, seed=0, steps=2), hub.sample(2, seed=0, steps=2))


def test_save_pretrained_refusals_are_one_line(unet_run, tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("mine")
    posthoc = difflab.load(unet_run.path, ema_length=0.1)  # weights no checkpoint holds
    for call, message in [(lambda: unet_run.save_pretrained(tmp_path / "full"),
                           f"save_pretrained {tmp_path / 'full'} already exists and is not an empty folder"),
                          (lambda: unet_run.save_pretrained(unet_run.path / "inside"), "is inside the run folder"),
                          (lambda: unet_run.save_pretrained(tmp_path / "x", format="onnx"),
                           "format must be one of run, diffusers, got 'onnx'"),
                          (lambda: unet_run.save_pretrained(None), "path must be a path"),
                          (lambda: posthoc.save_pretrained(tmp_path / "p"), "this model's weights are not those of")]:
        with pytest.raises(UsageError) as caught:
            call()
        assert message in str(caught.value) and "\n" not in str(caught.value)
    assert (tmp_path / "full" / "x").read_text() == "mine" and not (tmp_path / "x").exists()
    assert not (tmp_path / "p").exists() and not (unet_run.path / "inside").exists()
    hub = difflab.load(posthoc.save_pretrained(tmp_path / "p", format="diffusers"))  # its own weights, exported
    same = {"sampler": "ddim", "steps": 4, "spacing": "uniform", "clip": "none"}
    assert int((hub.sample(3, **same).int() - posthoc.sample(3, **same).int()).abs().max()) <= 1
    with pytest.raises(UsageError, match="is a diffusers folder, not a difflab run: save it with format='diffusers'"):
        hub.save_pretrained(tmp_path / "r")
