"""The explorer's edit panel (SDEdit and RePaint of an uploaded or dataset image, by Model.edit) and few-step
panel (the same seeds at a few network-evaluation budgets, by the one drawing path), over HTTP on the tiny run:
each equal pixel for pixel to what Python and ``difflab sample`` draw with the same settings."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image
from serve_helpers import events, png_array, request, runs_dir, server  # noqa: F401 - fixtures

import difflab


def data_url(array: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def job(server, path, body) -> list[dict]:  # noqa: F811 - the fixture, passed on
    status, answer = request(server, path, body)
    assert status == 202, answer
    evs = events(server, answer["job"])
    assert evs[-1]["type"] == "done", evs[-1]
    return evs


@pytest.fixture(scope="module")
def model(runs_dir):  # noqa: F811
    return difflab.load(runs_dir / "tiny")


def edits(evs: list[dict]) -> torch.Tensor:
    shown = sorted((e["index"], png_array(e["png"])) for e in evs if e["type"] == "image")
    assert [i for i, _ in shown] == list(range(len(shown)))
    return torch.from_numpy(np.stack([a for _, a in shown]))


def test_the_edit_panel_is_model_edit_of_the_fitted_upload(server, model):  # noqa: F811
    """SDEdit of an uploaded image (fitted to the run as the invert panel fits it): the streamed edits are
    Model.edit's, and edit 0's path shows each of the round(strength steps) steps it ran."""
    from difflab.data.upload import decode_image_bytes

    upload = np.full((24, 24), 20, np.uint8)
    upload[4:20, 9:15] = 230
    url = data_url(upload)
    evs = job(server, "/api/edit", {"run": "tiny", "image": url, "strength": 0.6, "count": 5, "seed": 3,
                                    "sampler": "ddim", "steps": 8, "label": 2})
    image = decode_image_bytes(base64.b64decode(url.split(",", 1)[1]), model.shape)
    want = model.edit(image[None].expand(5, -1, -1, -1), strength=0.6, seed=3, sampler="ddim", steps=8, labels=2)
    assert torch.equal(edits(evs), want)
    start = next(e for e in evs if e["type"] == "start")
    assert np.array_equal(png_array(start["original"]), image.numpy()) and start["method"] == "sdedit"
    steps = [e for e in evs if e["type"] == "step"]
    assert start["steps"] == len(steps) == 5 and [e["i"] for e in steps] == list(range(5))
    assert all(e["sigma"] > 0 and png_array(e["x0"]).shape == (1, 8, 8) for e in steps)
    assert [e["sigma"] for e in steps] == sorted((e["sigma"] for e in steps), reverse=True)
    # one edit alone (the page's replay of its path) is that edit of the whole request
    again = job(server, "/api/edit", {"run": "tiny", "image": url, "strength": 0.6, "count": 1, "first": 2, "seed": 3,
                                      "sampler": "ddim", "steps": 8, "label": 2})
    (one,) = [e for e in again if e["type"] == "image"]
    assert one["index"] == 2 and np.array_equal(png_array(one["png"]), want[2].numpy())
    assert len([e for e in again if e["type"] == "step" and e["index"] == 2]) == 5


def test_the_edit_panel_repaints_a_painted_mask_of_a_dataset_image(server, model, runs_dir):  # noqa: F811
    """RePaint of dataset image 4 under a painted mask with resampling: Model.edit's images (the classes cycled
    as in Model.edit), the unpainted pixels exactly the original's, every pass's steps on the path."""
    from difflab.serve.catalog import Catalog

    image = Catalog(runs_dir).training_data("tiny").images[4]
    painted = np.zeros((8, 8), np.uint8)
    painted[4:, :] = 255  # the lower half
    evs = job(server, "/api/edit", {"run": "tiny", "index": 4, "mask": data_url(painted), "strength": 1, "count": 3,
                                    "seed": 1, "sampler": "ddpm", "steps": 6, "jump_length": 2, "resample": 2})
    mask = torch.from_numpy(painted >= 128)
    walked = []
    want = model.edit(image[None].expand(3, -1, -1, -1), mask=mask, strength=1.0, seed=1, sampler="ddpm", steps=6,
                      jump_length=2, resample=2, callback=walked.append)
    got = edits(evs)
    assert torch.equal(got, want)
    assert torch.equal(got[:, :, :4], image[None, :, :4].expand(3, -1, -1, -1))
    start = next(e for e in evs if e["type"] == "start")
    assert start["method"] == "repaint" and np.array_equal(png_array(start["mask"])[0] >= 128, painted >= 128)
    steps = [e for e in evs if e["type"] == "step"]
    assert start["steps"] is None and len(steps) == len(walked) > 6  # the sampler's steps, the jumps back included
    assert [e["sigma"] for e in steps] == [float(w["sigma"]) for w in walked]


def test_cancel_stops_an_edit(server):  # noqa: F811
    status, answer = request(server, "/api/edit", {"run": "tiny", "index": 0, "strength": 1, "count": 16,
                                                   "sampler": "ddpm", "steps": 1000})
    assert status == 202
    seen = []

    def on_event(ev):
        if ev["type"] == "step" and len(seen) == 0:
            seen.append(ev)
            request(server, f"/api/jobs/{answer['job']}/cancel", {})

    evs = events(server, answer["job"], on_event=on_event)
    assert evs[-1]["type"] == "cancelled" and len([e for e in evs if e["type"] == "step"]) < 1000


def test_the_few_step_panel_is_difflab_sample_at_each_budget(server, runs_dir, tmp_path):  # noqa: F811
    """Each cell is `difflab sample --run R --steps k [--sampler S] --seed 0` at the most steps k whose network
    evaluations fit its budget; the run's own sampler unless one is named; a budget that fits no more steps
    than a smaller one repeats its images; one that fits no step says what it needs."""
    from difflab.cli import main
    from difflab.samplers import evaluations

    evs = job(server, "/api/fewstep", {"run": "tiny", "samplers": [None, "heun", "langevin"], "budgets": [1, 2, 4],
                                       "count": 3, "seed": 0})
    start = next(e for e in evs if e["type"] == "start")
    own = difflab.load(runs_dir / "tiny").run.cfg.sampler
    assert start["rows"] == [own, "heun", "langevin"] and start["budgets"] == [1, 2, 4]
    cells = {(e["row"], e["column"]): e for e in evs if e["type"] == "cell"}
    assert len(cells) == 9
    assert [cells[1, c]["steps"] for c in range(3)] == [1, 1, 2]  # heun: 2 steps - 1 evaluations
    assert cells[1, 1]["same_as"] == 0 and cells[1, 1]["images"] == cells[1, 0]["images"]
    assert all(cells[2, c]["needs"] == evaluations("langevin", 1) for c in range(3))
    drawn = {}
    for (row, _), cell in cells.items():
        if "needs" in cell:
            continue
        assert cell["evaluations"] <= cell["budget"] and len(cell["images"]) == 3
        key = (cell["sampler"], cell["steps"])
        if key not in drawn:
            flags = [] if row == 0 else ["--sampler", cell["sampler"]]
            out = tmp_path / f"{cell['sampler']}-{cell['steps']}.npz"
            assert main(["sample", "--run", str(runs_dir / "tiny"), "--steps", str(cell["steps"]), "--seed", "0",
                         "--n", "3", "--out", str(tmp_path / "grid.png"), "--force", "--save-npz", str(out), *flags]) == 0
            drawn[key] = np.load(out)["images"].transpose(0, 3, 1, 2)
        assert np.array_equal(np.stack([png_array(p) for p in cell["images"]]), drawn[key]), key
    assert cells[0, 2]["steps"] == 4 and cells[0, 2]["seconds"] > 0


@pytest.fixture(scope="module")
def own_algorithm(tmp_path_factory):
    """A runs folder with a naive2 run: a method that declares no samplers and draws with its own algorithm."""
    from difflab.config import TrainConfig
    from difflab.training.trainer import Trainer

    root = tmp_path_factory.mktemp("own")
    cfg = TrainConfig(data="digits", out=str(root / "n2"), model="tiny", method="naive2", steps=2, batch_size=8,
                      log_every=2, checkpoint_every=2, sample_every=0, sample_steps=3, warmup=1)
    Trainer(cfg, progress=False, log=lambda *a: None).run()
    return root


def test_the_few_step_panel_follows_the_methods_declared_samplers(own_algorithm):
    """A method with no sampler of the table (its own algorithm, one network call a step) gets one row, drawn with
    its own algorithm at k = budget steps, the images of the run's own sample call; naming a sampler is refused,
    and so is editing (no denoiser)."""
    from difflab.serve.catalog import Catalog
    from difflab.serve.jobs import Job
    from difflab.serve.panels import Panels
    from difflab.serve.requests import BadRequest, EditRequest, FewStepRequest

    catalog = Catalog(own_algorithm)
    info = catalog.info("n2")
    req = FewStepRequest.from_json({"budgets": [1, 4], "count": 2, "seed": 5}, info)
    job = Job("1", "fewstep", Panels(catalog).fewstep(req))
    job.work(job)
    start, *cells = job.events
    assert start["rows"] == [None] and [(c["steps"], c["evaluations"]) for c in cells] == [(1, 1), (4, 4)]
    run = difflab.load(own_algorithm / "n2")
    for c in cells:
        assert np.array_equal(np.stack([png_array(p) for p in c["images"]]), run.sample(2, seed=5, steps=c["steps"]))
    with pytest.raises(BadRequest, match="samples with its own algorithm"):
        FewStepRequest.from_json({"samplers": ["ddim"]}, info)
    with pytest.raises(BadRequest, match="editing needs a Gaussian run"):
        EditRequest.from_json({"index": 0}, info, 1 << 20)


def test_a_diffusers_folder_draws_few_steps_with_its_scheduler_and_is_not_edited(tmp_path):
    """A diffusers folder's own sampler (its scheduler's) at each budget is what Python draws at those steps;
    editing it is refused with one line (Model.edit needs a difflab run)."""
    diffusers = pytest.importorskip("diffusers")
    from difflab.serve.catalog import Catalog
    from difflab.serve.jobs import Job
    from difflab.serve.panels import Panels
    from difflab.serve.requests import BadRequest, EditRequest, FewStepRequest

    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                                 block_out_channels=(8, 16), norm_num_groups=4,
                                 down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))
    unet.save_pretrained(tmp_path / "hub")
    diffusers.DDIMScheduler(clip_sample=True).save_pretrained(tmp_path / "hub")
    catalog = Catalog(tmp_path)
    info = catalog.info("hub")
    job = Job("1", "fewstep", Panels(catalog).fewstep(FewStepRequest.from_json({"budgets": [1, 3], "count": 2}, info)))
    job.work(job)
    cells = [e for e in job.events if e["type"] == "cell"]
    assert [(c["steps"], c["evaluations"]) for c in cells] == [(1, 1), (3, 3)]
    hub = difflab.load(tmp_path / "hub")
    for c in cells:
        assert np.array_equal(np.stack([png_array(p) for p in c["images"]]), hub.sample(2, seed=0, steps=c["steps"]))
    with pytest.raises(BadRequest, match="editing needs a difflab run; hub is a diffusers folder"):
        EditRequest.from_json({"index": 0}, info, 1 << 20)


def test_model_edit_callback_must_be_a_function(model):
    from difflab.errors import UsageError

    with pytest.raises(UsageError, match="callback must be a function or None"):
        model.edit(torch.zeros((1, *model.shape), dtype=torch.uint8), callback="print")
