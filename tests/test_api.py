"""The Python API (``difflab.train``, ``difflab.load``, ``Model``) against the commands it stands beside:
the same config, the same images, the same refusals."""

from __future__ import annotations

import io
import json
import math
from contextlib import redirect_stderr, redirect_stdout

import numpy as np
import pytest
import torch

import difflab
from difflab.cli import main
from difflab.errors import CheckpointError, UsageError
from difflab.runs.request import ModelTraits, SampleRequest

TINY = {"data": "digits", "model": "tiny", "batch_size": 8, "log_every": 1, "checkpoint_every": 2,
        "sample_every": 0, "sample_steps": 2, "warmup": 1}


def cli(*args) -> str:
    """stdout of ``difflab ARGS`` in this process; fails the test on a non-zero exit."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        rc = main([str(a) for a in args])
    assert rc == 0, err.getvalue()
    return out.getvalue()


def flags(settings: dict) -> list[str]:
    return [a for k, v in settings.items() for a in (f"--{k.replace('_', '-')}", str(v))]


def npz_images(path) -> torch.Tensor:
    return torch.from_numpy(np.load(path)["images"]).permute(0, 3, 1, 2)


@pytest.fixture(scope="module")
def model(tmp_path_factory, one_thread):
    out = tmp_path_factory.mktemp("api") / "run"
    # cosine: samplers that differ in their last steps give other images (a 2-step flow network's do not differ in
    # uint8); the default process is trained and drawn in tests/test_flow.py and by the other fixtures
    return difflab.train(**TINY, steps=2, process="cosine", out=str(out))


def test_train_returns_the_loaded_run_and_samples_what_the_cli_samples(model, tmp_path):
    assert isinstance(model, difflab.Model) and model.run.step == 2 and model.shape == (1, 8, 8)
    images = model.sample(5, seed=3, steps=2, sampler="ddpm")
    assert images.dtype == torch.uint8 and images.shape == (5, 1, 8, 8)
    cli("sample", "--run", model.path, "--n", 5, "--seed", 3, "--steps", 2, "--sampler", "ddpm",
        "--save-npz", tmp_path / "s.npz", "--out", tmp_path / "g.png")
    assert torch.equal(images, npz_images(tmp_path / "s.npz"))
    again = difflab.load(model.path).sample(5, seed=3, steps=2, sampler="ddpm")
    assert torch.equal(images, again)
    assert not torch.equal(images, model.sample(5, seed=4, steps=2, sampler="ddpm"))


def test_pil_images(model):
    pics = model.sample(3, seed=1, steps=1, pil=True)
    assert len(pics) == 3 and pics[0].size == (8, 8) and pics[0].mode == "L"
    assert np.array_equal(np.asarray(pics[2]), model.sample(3, seed=1, steps=1)[2, 0].numpy())


def test_method_defaults_are_the_clis(tmp_path, one_thread):
    """naive1 through the API and through the CLI: one config.json (the series' settings, T = 60, k = 32)."""
    settings = {**TINY, "method": "naive1", "steps": 1, "checkpoint_every": 1}
    naive = difflab.train(**settings, out=str(tmp_path / "api"))
    cli("train", *flags(settings), "--out", tmp_path / "cli", "--quiet")
    api, ours = (json.loads((tmp_path / name / "config.json").read_text()) for name in ("api", "cli"))
    assert api.pop("out") != ours.pop("out")
    assert api == ours
    assert (api["T"], api["k"], api["lr"], api["grad_clip"]) == (60, 32, 3e-4, 1.0)
    # a method seeded per batch samples the CLI's images too, and has no ODE to invert
    cli("sample", "--run", naive.path, "--n", 3, "--seed", 1, "--batch-size", 2, "--save-npz", tmp_path / "s.npz")
    assert torch.equal(naive.sample(3, seed=1, batch_size=2), npz_images(tmp_path / "s.npz"))
    with pytest.raises(UsageError, match="invert needs a Gaussian run"):
        naive.invert(torch.zeros(1, 1, 8, 8, dtype=torch.uint8))


def test_given_settings_win_over_the_method_defaults():
    from difflab.recipe import build_config

    assert build_config({"method": "naive1", "T": 30}).T == 30
    assert build_config({"method": "naive1"}).T == 60
    assert build_config({}).T == 1000


def test_a_diffusers_folder_samples_as_the_cli_does(tmp_path, one_thread):
    run = difflab.train(**{**TINY, "model": "mnist-small", "channels_mult": "32,64", "checkpoint_every": 1}, steps=1,
                        process="cosine", out=str(tmp_path / "run"))  # the tiny preset has no diffusers twin
    cli("export", "--run", run.path, "--to", "diffusers", tmp_path / "hub")  # (a DDIM folder; flow: tests/test_flow.py)
    folder = difflab.load(tmp_path / "hub")
    assert folder.run is None and folder.shape == (1, 8, 8)
    images = folder.sample(4, seed=2, steps=3)
    cli("sample", "--diffusers-model", tmp_path / "hub", "--n", 4, "--seed", 2, "--steps", 3,
        "--save-npz", tmp_path / "s.npz")
    assert torch.equal(images, npz_images(tmp_path / "s.npz"))
    with pytest.raises(UsageError, match="--guidance needs"):
        folder.sample(2, guidance=3.0)
    # the page streams a folder part by part on the same path: its scheduler's grid, the same images
    from difflab.streaming import stream_samples

    parts = list(stream_samples(folder.source, 4, chunk=2, seed=2, steps=3))
    assert [lo for lo, _ in parts] == [0, 1, 3] and torch.equal(torch.cat([im for _, im in parts]), images)
    assert not torch.equal(images, folder.sample(4, seed=2, steps=3, spacing="uniform"))  # (difflab's grid differs)


def test_the_final_grid_is_what_difflab_sample_draws(model, tmp_path):
    """RUN/samples/final.png is `difflab sample --run RUN --n 64 --seed 0`, pixel for pixel, grid included."""
    from PIL import Image

    cli("sample", "--run", model.path, "--n", 64, "--seed", 0, "--out", tmp_path / "g.png")
    final = np.asarray(Image.open(model.path / "samples" / "final.png"))
    assert np.array_equal(final, np.asarray(Image.open(tmp_path / "g.png")))


def test_interpolation_ends_are_the_seeds_samples(model):
    strip = model.interpolate(3, 5, 3, steps=2)
    assert strip.shape == (3, 1, 8, 8)
    for seed, image in ((3, strip[0]), (5, strip[-1])):
        assert torch.equal(image, model.sample(1, seed=seed, steps=2, sampler="ddim", clip="none")[0])


def test_inverted_latents_decode_with_sample(model):
    from difflab.latents import invert_images

    images = model.sample(3, seed=0, steps=2)
    latents = model.invert(images, steps=4)
    assert latents.shape == (3, 1, 8, 8) and latents.dtype == torch.float32
    _, recon = invert_images(model.run.denoiser(), images.float() / 127.5 - 1, 4)
    decoded = model.sample(3, init_noise=latents, sampler="ddim", steps=4, clip="none")
    assert torch.equal(decoded, recon)


def test_invert_then_decode_gives_the_images_back(model):
    """The README's round trip: 20 DDIM steps each way, 3 refinements, on digits test images (this 2-step
    run: mean error 0.8/255, the largest 1/255, as invert's docstring says)."""
    from difflab.data import load

    images = load("digits", split="test").images[:16]
    back = model.decode(model.invert(images, steps=20, refine=3), steps=20)
    err = (back.int() - images.int()).abs()
    assert back.dtype == torch.uint8 and float(err.float().mean()) < 1.0 and int(err.max()) <= 1
    with pytest.raises(UsageError, match="decode takes finite float latents"):
        model.decode(images, steps=2)


def test_likelihood_is_bits_per_dim(model):
    images = model.sample(2, seed=0, steps=2)
    bpd = model.likelihood(images, steps=2, seed=1)
    assert bpd.shape == (2,) and all(0 < b < 100 and math.isfinite(b) for b in bpd.tolist())
    assert torch.equal(bpd, model.likelihood(images, steps=2, seed=1))


@pytest.mark.parametrize("kwargs, message", [
    ({"n": 0}, "--n must be in [1, 1000000], got 0"),
    ({"n": 2.5}, "--n must be a whole number"),
    ({"steps": float("nan")}, "--steps must be a finite number"),
    ({"guidance": float("inf")}, "--guidance must be a finite number"),
    ({"seed": -1}, "--seed must be in"),
    ({"sampler": "nope"}, "--sampler must be one of"),
    ({"labels": 3}, "this run is unconditional: --class needs --classifier"),
    ({"labels": [0, 1]}, "one per sample"),
    ({"labels": "3"}, "--class must be a class index"),
    ({"labels": [[0], "a"]}, "--class must be a class index"),
    ({"prompt": "a cat"}, "--prompt needs a run trained with --conditioning text"),
    ({"guidance": 2.0}, "--guidance needs a run trained with --conditioning class|text"),
    ({"init_noise": torch.zeros(3, 1, 4, 4)}, "--init-noise has images of shape [1, 4, 4]; this model draws [1, 8, 8]"),
    ({"init_noise": torch.full((3, 1, 8, 8), float("nan"))}, "NaN"),
    ({"precision": "fp8"}, "--precision must be one of fp32, bf16"),
    ({"flavour": 1}, "unknown sampling setting 'flavour'"),
])
def test_bad_sampling_settings_are_one_clear_line(model, kwargs, message):
    with pytest.raises(UsageError) as caught:
        model.sample(**{"n": 3, **kwargs})
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_bad_arguments_elsewhere(model, tmp_path):
    with pytest.raises(UsageError, match="unknown training setting 'flavour'"):
        difflab.train(flavour="vanilla")
    with pytest.raises(CheckpointError, match="does not exist"):
        difflab.load(tmp_path / "nothing")
    with pytest.raises(UsageError, match=r"invert takes uint8 images \[N, 1, 8, 8\], got torch.float32"):
        model.invert(torch.zeros(2, 1, 8, 8))
    with pytest.raises(UsageError, match="n must be at least 2"):
        model.interpolate(0, 1, 1)
    with pytest.raises(UsageError, match="labels must hold one class per image"):
        model.likelihood(torch.zeros(2, 1, 8, 8, dtype=torch.uint8), labels=[1])


def test_a_request_checks_itself_and_fills_the_models_defaults():
    class_run = ModelTraits("gaussian", True, "class", 10, (1, 8, 8), {"sampler": "heun", "steps": 7})
    req = SampleRequest(n=4, start=8).resolve(class_run)
    assert (req.sampler, req.steps, req.label_tensor().tolist()) == ("heun", 7, [8, 9, 0, 1])
    assert SampleRequest(n=3, labels=2, steps=1).resolve(class_run).label_tensor().tolist() == [2, 2, 2]
    part = req.part(1, 2)
    assert (part.start, part.n, part.label_tensor().tolist()) == (9, 2, [9, 0])
    with pytest.raises(UsageError, match="--class must be in 0..9 for this run, got 10"):
        SampleRequest(n=2, labels=10).resolve(class_run)
    with pytest.raises(UsageError, match="--class must be in 0..9 for this run, got -1"):
        SampleRequest(n=2, labels=[3, -1]).resolve(class_run)
    naive = ModelTraits("naive1", False, "none", 0, (1, 8, 8))
    with pytest.raises(UsageError, match="conditioning and guidance need a Gaussian run, this one is naive1"):
        SampleRequest(n=2, labels=1, classifier="clf").resolve(naive)
    assert SampleRequest(sampler="heun", steps=5).evaluations() == 9


def test_unipc_lower_order_final_travels_from_the_cli_and_python(model, tmp_path):
    on = model.sample(3, seed=1, steps=6, sampler="unipc", lower_order_final=True)
    off = model.sample(3, seed=1, steps=6, sampler="unipc")
    assert torch.equal(off, model.sample(3, seed=1, steps=6, sampler="unipc", lower_order_final=False))
    assert not torch.equal(on, off)  # the last steps' order differs
    cli("sample", "--run", model.path, "--n", 3, "--seed", 1, "--steps", 6, "--sampler", "unipc", "--lower-order-final",
        "--save-npz", tmp_path / "s.npz", "--out", tmp_path / "g.png")
    assert torch.equal(on, npz_images(tmp_path / "s.npz"))
    with pytest.raises(UsageError, match="takes no option lower_order_final"):
        model.sample(2, steps=3, sampler="ddim", lower_order_final=True)
    with pytest.raises(UsageError, match="lower_order_final must be True or False"):
        SampleRequest(n=2, lower_order_final="yes")
