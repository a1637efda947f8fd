"""difflab export --to diffusers: the folder diffusers' pipelines load, and their images equal difflab's."""

from __future__ import annotations

import json
import logging
import warnings

import numpy as np
import pytest
import torch

from difflab.cli import main
from difflab.config import TrainConfig
from difflab.training.trainer import Trainer

diffusers = pytest.importorskip("diffusers")


def _train(out, **kw):
    kw = {"model": "mnist-small", "channels_mult": "32,64", "data": "digits", "steps": 6, "checkpoint_every": 6, **kw}
    cfg = TrainConfig(out=str(out), batch_size=8, log_every=3, sample_every=0, sample_steps=2, warmup=1, lr=3e-3, **kw)
    Trainer(cfg, progress=False, log=lambda *a: None).run()
    return out


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    run = _train(root / "run", prediction="v", process="cosine")
    code = main(["export", "--run", str(run), "--to", "diffusers", str(root / "hub")])
    assert code == 0
    return run, root / "hub"


def test_folder_has_the_hub_layout_and_loads_without_warnings(exported, caplog, monkeypatch):
    run, out = exported
    assert {p.name for p in out.iterdir()} >= {"model_index.json", "unet", "scheduler", "README.md", "samples.png"}
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").exists()
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: diffusers\npipeline_tag: unconditional-image-generation")
    assert "datasets:\n- digits" in card and "6 steps" in card and "](samples.png)" in card
    sched = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert sched["prediction_type"] == "v_prediction" and sched["beta_schedule"] == "squaredcos_cap_v2"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    caplog.set_level(logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        diffusers.DDPMPipeline.from_pretrained(out)
        diffusers.DDIMPipeline.from_pretrained(out)
        diffusers.UNet2DModel.from_pretrained(out, subfolder="unet")
    # diffusers warns when `accelerate` is missing whatever folder it loads: that is the environment, not ours
    ours = [r for r in caplog.records if r.levelno >= logging.WARNING and "accelerate" not in r.getMessage()]
    assert not ours, ours


def test_diffusers_pipeline_images_equal_difflab(exported):
    from difflab.figures import to_uint8
    from difflab.runs.draw import load_run

    run, out = exported
    pipe = diffusers.DDIMPipeline.from_pretrained(out)
    ref = pipe(batch_size=4, generator=torch.Generator().manual_seed(0), num_inference_steps=10, eta=0.0,
               use_clipped_model_output=True, output_type="np").images
    noise = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    ours = load_run(run).sample(4, sampler="ddim", steps=10, init_noise=noise)
    want = torch.from_numpy(np.round(ref * 255)).permute(0, 3, 1, 2).int()
    diff = (ours.int() - want).abs()
    assert int(diff.max()) <= 1, int(diff.max())
    # the exported UNet at diffusers' timestep tau is difflab's net at step tau + 1
    den = load_run(run).denoiser()
    z = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        a = den.net(z, torch.tensor([1.0, 640.0]))
        b = pipe.unet(z, torch.tensor([0, 639])).sample
    assert torch.allclose(a, b, atol=1e-4)
    assert float(to_uint8(ours.float() / 127.5 - 1).float().std()) > 0  # not a blank image


@pytest.mark.parametrize("kw,why", [({"method": "naive2", "model": "series-alg2", "channels_mult": ""}, "method"),
                                    ({"process": "vp"}, "continuous"), ({"prediction": "edm"}, "prediction")])
def test_unrepresentable_runs_fail_with_one_line(tmp_path, capsys, kw, why):
    run = _train(tmp_path / "run", **kw)
    code = main(["export", "--run", str(run), "--to", "diffusers", str(tmp_path / "hub")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and why in err and "cannot export" in err, err
    assert not (tmp_path / "hub").exists()


def test_export_never_overwrites(exported, capsys):
    run, out = exported
    assert main(["export", "--run", str(run), "--to", "diffusers", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err


def test_invert_likelihood_and_evaluate_of_the_exported_folder_equal_the_run(exported, tmp_path, capsys):
    """The exported folder is the run: --diffusers-model gives the run's latents, bits/dim and samples."""
    run, out = exported
    res = {}
    for key, model in [("run", ["--run", str(run)]), ("hub", ["--diffusers-model", str(out), "--data", "digits"])]:
        assert main(["invert", *model, "--n", "3", "--steps", "6", "--out", str(tmp_path / f"{key}.png"),
                     "--save-latents", str(tmp_path / f"{key}.npy")]) == 0
        assert main(["likelihood", *model, "--n", "2", "--steps", "3", "--json", str(tmp_path / f"{key}.json")]) == 0
        assert main(["evaluate", *model, "--n", "6", "--sampler", "ddim", "--steps", "4", "--features", "classifier",
                     "--metrics", "fid", "--json", str(tmp_path / f"{key}-e.json")]) == 0
        res[key] = (np.load(tmp_path / f"{key}.npy"), json.loads((tmp_path / f"{key}.json").read_text()),
                    json.loads((tmp_path / f"{key}-e.json").read_text()))
    capsys.readouterr()
    assert np.allclose(res["run"][0], res["hub"][0], atol=1e-3)
    assert res["run"][1]["bits_per_dim"] == pytest.approx(res["hub"][1]["bits_per_dim"], rel=1e-4)
    assert res["run"][2]["fid"] == pytest.approx(res["hub"][2]["fid"], rel=0.02)


def _card(out):
    """(the YAML header, the Python snippet, the text) of an exported folder's model card."""
    import re

    import yaml

    card = (out / "README.md").read_text()
    _, header, text = card.split("---\n", 2)
    return yaml.safe_load(header), re.search(r"```python\n(.*?)```", text, re.S).group(1), text


def _snippet_draws_the_card_image(out, tmp_path):
    """Run the card's own snippet on the folder: its images are samples.png, pixel for pixel."""
    from PIL import Image

    from difflab.interop.export import save_snippet_grid

    _, code, _ = _card(out)
    scope: dict = {}
    exec(code.replace("PATH_OR_REPO", str(out)), scope)  # noqa: S102 (the card's code, as a reader runs it)
    drawn = save_snippet_grid(scope["images"], tmp_path / "drawn.png")
    assert len(scope["images"]) == 16
    assert np.array_equal(np.asarray(Image.open(drawn)), np.asarray(Image.open(out / "samples.png")))


def test_the_card_names_the_data_its_license_and_draws_its_image_with_its_snippet(exported, tmp_path):
    run, out = exported
    meta, code, text = _card(out)
    assert meta["license"] == "cc-by-4.0" and meta["datasets"] == ["digits"]  # the UCI digits' license
    assert "generator=torch.Generator().manual_seed(0)" in code and "num_inference_steps=2," in code  # the run's --sample-steps
    assert str(run) not in text and str(run.parent) not in text and "not known to difflab" not in text
    _snippet_draws_the_card_image(out, tmp_path)


def test_a_class_run_on_a_folder_exports_its_name_and_the_license_given(tmp_path, capsys):
    from PIL import Image

    from difflab.data import load
    from difflab.interop.export import data_card

    data = load("digits")
    for i in range(40):  # a folder of images with class sub-folders
        (tmp_path / "my digits" / str(int(data.labels[i]))).mkdir(parents=True, exist_ok=True)
        Image.fromarray(data.images[i, 0].numpy()).save(tmp_path / "my digits" / str(int(data.labels[i])) / f"{i}.png")
    run = _train(tmp_path / "run", data=str(tmp_path / "my digits"), conditioning="class", labels=True, steps=1,
                 checkpoint_every=1)
    assert main(["export", "--run", str(run), "--to", "diffusers", str(tmp_path / "a")]) == 0
    meta, code, text = _card(tmp_path / "a")
    assert meta["license"] == "unknown" and "`difflab export --license ID`" in text
    assert meta["datasets"] == ["my digits"] and str(tmp_path) not in text
    assert "class_labels=labels" in code
    _snippet_draws_the_card_image(tmp_path / "a", tmp_path)
    from difflab.interop.export import model_card, snippet
    from difflab.runs.draw import load_run

    loaded = load_run(run)
    card = model_card(loaded, "ddpm", "samples.png", snippet(loaded, 16)[-1], license="cc0-1.0")
    assert "\nlicense: cc0-1.0\n" in card and "not known to difflab" not in card
    assert main(["export", "--run", str(run), "--to", "diffusers", str(tmp_path / "c"), "--license", "MIT; rm"]) == 2
    assert "--license must be a license id such as mit" in capsys.readouterr().err and not (tmp_path / "c").exists()
    assert data_card("in-memory:0123456789abcdef") == (None, "unknown")
    assert data_card("~/pictures/cats/") == ("cats", "unknown") and data_card("MNIST") == ("mnist", "cc-by-sa-3.0")
