"""The thin front ends: ``difflab invert``, ``likelihood`` and ``interpolate``, and the page's invert and
interpolate panels, answer what the :class:`difflab.Model` call with the same arguments returns, pixel for
pixel and number for number (on the class-conditional tiny run of the explorer's tests, so the images' own
classes are part of what must agree)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from serve_helpers import png_array, runs_dir  # noqa: F401 - fixture

import difflab
from difflab.cli import main
from difflab.errors import UsageError
from difflab.figures import save_rows


@pytest.fixture(scope="module")
def model(runs_dir):  # noqa: F811
    return difflab.load(runs_dir / "tiny")


@pytest.fixture(scope="module")
def digits(model):
    """The first 3 digits test images, fitted to the run, as the commands read them."""
    from difflab.runs.data import load_fitted

    return load_fitted("digits", "test", model.shape).subset(3)


def _pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path))


def _strip(rows, path) -> np.ndarray:
    """The pixels of the strip the commands draw of ``rows``."""
    return _pixels(save_rows(rows, path))


def test_cli_invert_is_model_invert_then_decode(model, digits, runs_dir, tmp_path, capsys):  # noqa: F811
    settings = dict(steps=5, spacing="karras", batch_size=2)
    assert main(["invert", "--run", str(runs_dir / "tiny"), "--data", "digits", "--n", "3", "--refine", "1",
                 "--steps", "5", "--spacing", "karras", "--batch-size", "2", "--out", str(tmp_path / "cli.png"),
                 "--save-latents", str(tmp_path / "z.npy")]) == 0, capsys.readouterr().err
    assert model.image_labels(digits.labels, digits.class_names) is digits.labels  # the run's own classes
    latents = model.invert(digits.images, refine=1, labels=digits.labels, **settings)
    assert torch.equal(torch.from_numpy(np.load(tmp_path / "z.npy")), latents)
    recon = model.decode(latents, labels=digits.labels, **settings)
    assert np.array_equal(_pixels(tmp_path / "cli.png"), _strip([digits.images, recon], tmp_path / "py.png"))
    # (the labels count: the null condition decodes other images)
    assert not torch.equal(model.decode(latents, **settings), recon)


def test_cli_likelihood_is_model_likelihood(model, digits, runs_dir, tmp_path, capsys):  # noqa: F811
    assert main(["likelihood", "--run", str(runs_dir / "tiny"), "--data", "digits", "--n", "3", "--steps", "2",
                 "--seed", "5", "--hutchinson-samples", "2", "--probe", "gaussian", "--batch-size", "2",
                 "--json", str(tmp_path / "b.json")]) == 0, capsys.readouterr().err
    done = []
    want = model.likelihood(digits.images, steps=2, seed=5, hutchinson_samples=2, probe="gaussian",
                            labels=digits.labels, batch_size=2, progress=done.append)
    assert json.loads((tmp_path / "b.json").read_text())["per_image"] == want.tolist()
    assert done == [0, 2, 1]  # started, then each batch


@pytest.mark.parametrize("ends", ["seeds", "images"])
def test_cli_interpolate_is_model_interpolate(model, digits, runs_dir, tmp_path, capsys, ends):  # noqa: F811
    if ends == "seeds":
        flags, a, b = ["--seeds", "4", "7"], 4, 7
    else:
        for i in range(2):
            Image.fromarray(digits.images[i, 0].numpy()).save(tmp_path / f"{i}.png")
        flags, (a, b) = ["--images", str(tmp_path / "0.png"), str(tmp_path / "1.png")], digits.images[:2]
    assert main(["interpolate", "--run", str(runs_dir / "tiny"), *flags, "--n", "4", "--steps", "3", "--class", "2",
                 "--spacing", "geometric", "--out", str(tmp_path / "cli.png")]) == 0, capsys.readouterr().err
    want = model.interpolate(a, b, 4, steps=3, label=2, spacing="geometric")
    assert np.array_equal(_pixels(tmp_path / "cli.png"), _strip([want], tmp_path / "py.png"))


def test_stop_cancels_model_work_at_the_next_network_call(model, digits):
    """The page's stop button: ``stop()`` is asked before every network call."""
    from difflab.streaming import Cancelled

    asked = []
    with pytest.raises(Cancelled):
        model.invert(digits.images, steps=20, stop=lambda: asked.append(1) or len(asked) > 3)
    assert len(asked) == 4
    shown = []
    with pytest.raises(Cancelled):
        model.interpolate(1, 2, 6, steps=2, batch_size=2, on_images=lambda first, images: shown.append(first),
                          stop=lambda: len(shown) == 2)
    assert shown == [0, 2]
    for call in (lambda: model.invert(digits.images, steps=1, stop=True),
                 lambda: model.interpolate(1, 2, 3, steps=1, on_images="show"),
                 lambda: model.likelihood(digits.images, steps=1, progress=[])):
        with pytest.raises(UsageError, match="must be a function or None"):
            call()


def _panel_events(runs_dir, kind: str, body: dict):  # noqa: F811
    """(The events of one panel job, run here without a server, and the panels.)"""
    from difflab.serve.catalog import Catalog
    from difflab.serve.jobs import Job
    from difflab.serve.panels import Panels
    from difflab.serve.requests import InterpolateRequest, InvertRequest

    catalog = Catalog(runs_dir)
    info = catalog.info("tiny")
    req = InterpolateRequest.from_json(body, info) if kind == "interpolate" else InvertRequest.from_json(body, info, 1 << 20)
    panels = Panels(catalog)
    job = Job("j", kind, getattr(panels, kind)(req))
    job.work(job)
    return job.events, panels


def test_the_interpolate_panel_shows_model_interpolate(model, runs_dir):  # noqa: F811
    evs, _ = _panel_events(runs_dir, "interpolate", {"run": "tiny", "seed_a": 4, "seed_b": 7, "n": 6, "steps": 4,
                                                     "label": 1})
    images = [e for e in evs if e["type"] == "image"]
    assert [e["index"] for e in images] == list(range(6))
    want = model.interpolate(4, 7, 6, steps=4, label=1)
    assert np.array_equal(np.stack([png_array(e["png"]) for e in images]), want.numpy())
    assert [e["t"] for e in images] == torch.linspace(0, 1, 6).tolist()


def test_the_invert_panel_shows_model_invert_and_decode(model, runs_dir):  # noqa: F811
    from difflab.figures import to_uint8
    from difflab.latents import reconstruction_error

    evs, panels = _panel_events(runs_dir, "invert", {"run": "tiny", "index": 3, "steps": 6})
    image, label = panels._image("tiny", 3)
    assert np.array_equal(png_array(evs[0]["original"]), image.numpy())
    latent = model.invert(image[None], steps=6, labels=[label])
    shown = next(e for e in evs if e["type"] == "latent")
    assert np.array_equal(png_array(shown["png"]), to_uint8(latent[0] / 3).numpy())
    assert shown["std"] == float(latent.std()) and shown["mean"] == float(latent.mean())
    recon = model.decode(latent, steps=6, labels=[label])
    rec = next(e for e in evs if e["type"] == "reconstruction")
    assert np.array_equal(png_array(rec["png"]), recon[0].numpy())
    assert rec["mse"] == reconstruction_error(image[None], recon)[0]
    assert not torch.equal(model.decode(latent, steps=6), recon)  # (decoded under the image's own class)


def test_the_invert_panel_takes_the_grid_and_refinements_of_difflab_invert(model, runs_dir):  # noqa: F811
    from difflab.figures import to_uint8
    from difflab.samplers import SPACINGS
    from difflab.serve.requests import BadRequest

    evs, panels = _panel_events(runs_dir, "invert", {"run": "tiny", "index": 3, "steps": 5, "spacing": "karras",
                                                     "refine": 2})
    image, label = panels._image("tiny", 3)
    latent = model.invert(image[None], steps=5, spacing="karras", refine=2, labels=[label])
    assert not torch.equal(latent, model.invert(image[None], steps=5, labels=[label]))
    shown = next(e for e in evs if e["type"] == "latent")
    assert np.array_equal(png_array(shown["png"]), to_uint8(latent[0] / 3).numpy())
    rec = next(e for e in evs if e["type"] == "reconstruction")
    recon = model.decode(latent, steps=5, spacing="karras", labels=[label])
    assert np.array_equal(png_array(rec["png"]), recon[0].numpy())
    assert (rec["spacing"], rec["refine"]) == ("karras", 2)
    for bad, message in (({"spacing": "linear"}, "spacing must be one of uniform, karras, geometric"),
                         ({"refine": 11}, "refine must be between 0 and 10"), ({"refine": 1.5}, "whole number")):
        with pytest.raises(BadRequest, match=message):
            _panel_events(runs_dir, "invert", {"run": "tiny", "index": 3, **bad})
    page = (Path(__file__).resolve().parents[1] / "src/difflab/serve/static/index.html").read_text()
    select = page.split('name="spacing"')[1].split("</select>")[0]
    assert tuple(re.findall(r'<option value="(\w+)"[^>]*>\w+</option>', select)) == SPACINGS  # the page's choices


# --- one forward chain per process family: the page's forward panel and `difflab figures` ------------------
def _method_of(name: str):
    """The method whose run draws the forward process ``name`` of the page (an entry of FORWARD_PROCESSES)."""
    from difflab.config import TrainConfig
    from difflab.forward import BINOMIAL_K, BINOMIAL_T, FORWARD_PROCESSES
    from difflab.methods.method import make_method

    family = FORWARD_PROCESSES[name][0]
    if family == "binomial":  # (16x16: without replacement, T = 256 / 32 = 8 steps)
        cfg = TrainConfig(method="naive1", k=BINOMIAL_K, T=BINOMIAL_T if name == "binomial" else 8,
                          replace=name == "binomial")
    elif family == "pixel":
        cfg = TrainConfig(method="naive2")
    elif family == "degradation":
        cfg = TrainConfig(method="cold", degradation=name)
    elif name.startswith("constant-"):
        cfg = TrainConfig(process="constant", gamma=float(name.split("-")[1]), T=120)
    else:
        cfg = TrainConfig(process=name)
    return make_method(cfg)


def test_every_forward_view_is_the_chain_its_method_draws():
    from difflab.figures import to_uint8
    from difflab.forward import FORWARD_PROCESSES, forward_view

    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    for name in FORWARD_PROCESSES:
        view = forward_view(name, x, levels=6, seed=4)
        chain = _method_of(name).noising_chain(x, 6, torch.Generator().manual_seed(4))
        assert torch.equal(view.frames, to_uint8(chain[:, 0])), name
        assert len(view.t) == len(chain), name
    # (another seed, another chain)
    assert not torch.equal(forward_view("cosine", x, levels=6, seed=5).frames, forward_view("cosine", x, levels=6).frames)


def test_the_forward_panel_shows_the_noising_figure(runs_dir, tmp_path, capsys):  # noqa: F811
    """The page's forward panel on image 0 of a run's data is row 0 of `difflab figures`' noising.png (the run's
    own process, cosine; the panel's 41 levels as 41 columns), for the same seed."""
    from difflab.serve.catalog import Catalog
    from difflab.serve.panels import Panels
    from difflab.serve.requests import ForwardRequest

    catalog = Catalog(runs_dir)
    view = Panels(catalog).forward(ForwardRequest.from_json({"run": "tiny", "process": "cosine", "seed": 6},
                                                            catalog.info("tiny")))
    assert main(["figures", "--run", str(runs_dir / "tiny"), "--out", str(tmp_path / "f"), "--n", "1", "--columns",
                 "41", "--grid", "1", "--seed", "6"]) == 0, capsys.readouterr().err
    frames = torch.from_numpy(np.stack([png_array(f) for f in view["frames"]]))
    assert len(frames) == 41
    panel = save_rows([frames], tmp_path / "panel.png", scale=8)  # (figures draw 8x8 images 8 times larger)
    assert np.array_equal(_pixels(tmp_path / "f" / "noising.png"), _pixels(panel))
