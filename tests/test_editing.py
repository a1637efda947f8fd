"""Editing: SDEdit and RePaint against closed forms for Gaussian data (difflab.editing), Model.edit and
difflab edit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from difflab.analytic import GaussianDataNet
from difflab.denoiser import Denoiser
from difflab.editing import edit_images, repaint, sdedit, start_index
from difflab.errors import UsageError
from difflab.noise import SeededNoise, sample_seeds
from difflab.processes import make_process
from difflab.processes.continuous import VPCosine
from difflab.samplers import generate, sampler_sigmas

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest

SHAPE = (1, 4, 4)
MU, S0 = 0.3, 0.5  # every pixel independent, N(MU, S0^2)


def exact(process: str = "cosine"):
    """The exact denoiser of the data on the cosine VP process, or on the flow process (its velocity: the
    grid then starts at t = 1, an infinite level, where samples are held as y / sigma)."""
    if process == "flow":
        proc = make_process({"kind": "flow"})
        return Denoiser(ReadsEveryPixel(GaussianDataNet(proc, MU, S0, prediction="velocity")), proc, "velocity")
    proc = VPCosine()
    return Denoiser(ReadsEveryPixel(GaussianDataNet(proc, MU, S0)), proc, "eps")


class ReadsEveryPixel(torch.nn.Module):
    """The exact network, made to read its whole input as a real one does: a non-finite pixel anywhere (a kept
    one too) spoils every output pixel."""

    def __init__(self, net):
        super().__init__()
        self.net, self.config = net, net.config

    def forward(self, z, t, **kw):
        return self.net(z, t, **kw) + 0 * z.sum(dim=tuple(range(1, z.ndim)), keepdim=True)


def images(n, seed=0, dtype=torch.float64):
    return (MU + S0 * torch.randn(n, *SHAPE, generator=torch.Generator().manual_seed(seed))).to(dtype)


def test_strength_picks_the_last_steps_of_the_grid():
    assert [start_index(10, s) for s in (0.0, 0.25, 0.5, 1.0)] == [10, 8, 5, 0]
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(UsageError, match="--strength must be in"):
            start_index(10, bad)


@pytest.mark.parametrize("strength,process", [(0.3, "cosine"), (0.6, "cosine"), (0.6, "flow")])
def test_sdedit_through_the_ode_is_the_exact_ode_map_from_the_noised_image(strength, process):
    den, n = exact(process), 64
    sigmas = sampler_sigmas(den.process, "heun", 200)
    x, seeds = images(n), sample_seeds(5, n)
    i = start_index(200, strength)
    s = float(sigmas[i])
    y = x + s * SeededNoise(seeds).initial(SHAPE, dtype=torch.float64)
    expected = MU + (y - MU) * S0 / (S0**2 + s**2) ** 0.5  # the probability-flow ODE of N(MU, S0^2) from s to 0
    out = sdedit(den, x, sigmas, strength, seeds, sampler="heun")
    assert float((out - expected).abs().max()) < 2e-3
    assert float((out - x).abs().mean()) > 0.05 and float((expected - MU).abs().mean()) > 0.05  # not trivial


def test_sdedit_strength_0_is_the_image_and_1_a_fresh_sample():
    den, n = exact(), 6
    sigmas = sampler_sigmas(den.process, "ddim", 10).float()
    x, seeds = images(n, dtype=torch.float32), sample_seeds(3, n)
    assert torch.equal(sdedit(den, x, sigmas, 0.0, seeds), x)
    fresh = generate(den, n, SHAPE, seed=3, sampler="ddim", steps=10, batch_size=n)
    torch.testing.assert_close(sdedit(den, x, sigmas, 1.0, seeds), fresh, rtol=0, atol=1e-6)
    # sample j depends only on its own seed: the same in any batch
    whole = edit_images(den, x, sigmas, seeds, strength=0.5, batch_size=n)
    assert torch.equal(whole, edit_images(den, x, sigmas, seeds, strength=0.5, batch_size=4))


@pytest.mark.parametrize("jump_length,resample,process", [(1, 1, "cosine"), (5, 3, "cosine"), (5, 3, "flow")])
def test_repaint_draws_the_masked_pixels_from_the_data_law(jump_length, resample, process):
    """Independent Gaussian pixels: the repainted ones are N(MU, S0^2), uncorrelated with each other and
    independent of the kept ones (set here far from the data, +-2); the kept ones are the originals exactly.
    On the flow process the walk starts at t = 1, where the kept pixels are the noise alone."""
    den, n = exact(process), 2000
    sigmas = sampler_sigmas(den.process, "ddpm", 250)
    x = torch.full((n, *SHAPE), 2.0, dtype=torch.float64)
    x[n // 2:] = -2.0
    mask = torch.zeros(1, *SHAPE, dtype=torch.bool)
    mask[..., :, :2] = True  # the left half is repainted
    out = repaint(den, x, mask, sigmas, sample_seeds(1, n), jump_length=jump_length, resample=resample)
    assert torch.equal(out[:, :, :, 2:], x[:, :, :, 2:])
    painted = out[:, 0, :, :2].reshape(n, -1)
    assert abs(float(painted.mean()) - MU) < 0.02 and abs(float(painted.std()) - S0) < 0.02
    for half in (painted[: n // 2], painted[n // 2:]):  # the same law next to +2 and next to -2
        assert abs(float(half.mean()) - MU) < 0.03 and abs(float(half.std()) - S0) < 0.03
    corr = torch.corrcoef(painted.T)
    assert float((corr - torch.eye(8, dtype=corr.dtype)).abs().max()) < 0.1


def test_repaint_with_nothing_masked_is_the_image_and_a_wrong_step_fails_the_law():
    den, n = exact(), 2000
    sigmas = sampler_sigmas(den.process, "ddpm", 250)
    x = images(n)
    none = torch.zeros(1, *SHAPE, dtype=torch.bool)
    assert torch.equal(repaint(den, x, none, sigmas, sample_seeds(0, n)), x)
    # DDIM without noise maps the prior to the data law too, but its last step from a 2-step grid does not:
    # the statistical check above tells the two apart
    every = torch.ones(1, *SHAPE, dtype=torch.bool)
    coarse = repaint(den, x, every, sampler_sigmas(den.process, "ddim", 2), sample_seeds(0, n), sampler="ddim")
    assert abs(float(coarse.std()) - S0) > 0.05
    with pytest.raises(UsageError, match="--jump-length"):
        repaint(den, x, every, sigmas, sample_seeds(0, n), jump_length=0)


# --- Model.edit and difflab edit on a trained run ------------------------------------------------------

TINY = {"data": "digits", "model": "tiny", "batch_size": 8, "log_every": 1, "checkpoint_every": 2,
        "sample_every": 0, "sample_steps": 4, "warmup": 1, "conditioning": "class", "cond_drop": 0.2}


@pytest.fixture(scope="module")
def model(tmp_path_factory, one_thread):
    import difflab

    # cosine, as the RePaint and SDEdit defaults were measured on (a 2-step flow network's edits barely depend on
    # the strength or the resampling in uint8)
    return difflab.train(**TINY, steps=2, process="cosine", out=str(tmp_path_factory.mktemp("edit") / "run"))


def digits(n):
    from difflab.data import load

    return load("digits", split="test").images[:n]


def test_model_edit_strength_1_is_a_sample_and_0_the_image(model):
    x = digits(4)
    labels = torch.tensor([3, 1, 4, 1])
    assert torch.equal(model.edit(x, strength=1.0, seed=2, labels=labels), model.sample(4, seed=2, labels=labels))
    assert torch.equal(model.edit(x, strength=0.0, seed=2, labels=labels), x)
    half = model.edit(x, strength=0.5, seed=2, labels=labels, sampler="ddim", steps=6)
    assert half.shape == x.shape and not torch.equal(half, x)
    assert torch.equal(half, model.edit(x, strength=0.5, seed=2, labels=labels, sampler="ddim", steps=6, batch_size=3))
    # the request's guidance reaches the edit
    assert not torch.equal(half, model.edit(x, strength=0.5, seed=2, labels=labels, sampler="ddim", steps=6, guidance=1.0))


def test_model_edit_with_a_mask_repaints_only_the_white_pixels(model):
    x = digits(3)
    mask = torch.zeros(8, 8, dtype=torch.uint8)
    mask[4:] = 255  # the lower half
    out = model.edit(x, mask=mask, seed=1, steps=6, jump_length=2, resample=2)
    assert torch.equal(out[:, :, :4], x[:, :, :4]) and not torch.equal(out[:, :, 4:], x[:, :, 4:])
    assert torch.equal(model.edit(x, mask=torch.zeros(8, 8, dtype=torch.bool), seed=1, steps=6), x)
    per_image = torch.stack([mask >= 128, torch.zeros(8, 8, dtype=torch.bool), mask >= 128])[:, None]
    out2 = model.edit(x, mask=per_image, seed=1, steps=6, jump_length=2, resample=2)
    assert torch.equal(out2[1], x[1]) and torch.equal(out2[0], out[0])


@pytest.mark.parametrize("kwargs,msg", [
    ({"strength": 1.5}, "--strength must be in [0, 1]"),
    ({"mask": torch.zeros(4, 4, dtype=torch.bool)}, "the mask has shape [4, 4]"),
    ({"mask": [[1, 0]]}, "the mask must be an image"),
    ({"mask": torch.full((8, 8), 2.0)}, "values in [0, 1]"),
    ({"init_noise": torch.zeros(2, 1, 8, 8)}, "no init_noise"),
    ({"jump_length": 0, "mask": torch.ones(8, 8, dtype=torch.bool)}, "--jump-length"),
])
def test_model_edit_refuses_bad_settings(model, kwargs, msg):
    with pytest.raises(UsageError) as e:
        model.edit(digits(2), steps=2, **kwargs)
    assert msg in str(e.value)
    with pytest.raises(UsageError, match="uint8 images"):
        model.edit(torch.zeros(2, 1, 16, 16, dtype=torch.uint8))


def _cli(capsys, *args):
    from difflab.cli import main

    capsys.readouterr()
    rc = main([str(a) for a in args])
    out = capsys.readouterr()
    return rc, out.out, out.err.strip()


def test_cli_edit_writes_the_edit_of_model_edit(model, capsys, tmp_path):
    from PIL import Image

    x = digits(1)
    Image.fromarray(x[0, 0].numpy()).save(tmp_path / "in.png")
    mask = np.zeros((8, 8), dtype=np.uint8)
    mask[:, 4:] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    rc, out, err = _cli(capsys, "edit", "--run", model.path, "--image", tmp_path / "in.png", "--strength", "0.5",
                        "--steps", "6", "--class", "7", "--seed", "3", "--out", tmp_path / "e.png")
    assert rc == 0, err
    got = torch.from_numpy(np.asarray(Image.open(tmp_path / "e.png")))[None, None]
    assert torch.equal(got, model.edit(x, strength=0.5, steps=6, labels=7, seed=3))
    rc, _, err = _cli(capsys, "edit", "--run", model.path, "--image", tmp_path / "in.png", "--mask", tmp_path / "mask.png",
                      "--steps", "6", "--jump-length", "3", "--resample", "2", "--out", tmp_path / "m.png")
    assert rc == 0, err
    got = torch.from_numpy(np.asarray(Image.open(tmp_path / "m.png")))[None, None]
    assert torch.equal(got, model.edit(x, mask=torch.from_numpy(mask), steps=6, jump_length=3, resample=2))
    assert torch.equal(got[..., :4], x[..., :4])


def test_cli_edit_bad_inputs_are_one_line_exit_2(model, capsys, tmp_path):
    from PIL import Image

    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(tmp_path / "in.png")
    Image.fromarray(np.zeros((16, 16), dtype=np.uint8)).save(tmp_path / "big.png")
    (tmp_path / "notes.txt").write_text("not an image")
    base = ("edit", "--run", model.path, "--steps", "2", "--out", tmp_path / "o.png")
    for args, msg in (
        (("--image", tmp_path / "big.png"), "is 16x16; this run draws 8x8"),
        (("--image", tmp_path / "in.png", "--mask", tmp_path / "big.png"), "--mask"),
        (("--image", tmp_path / "in.png", "--mask", tmp_path / "notes.txt"), "is not an image"),
        (("--image", tmp_path / "notes.txt"), "is not an image"),
        (("--image", tmp_path / "nothing.png"), "is not a file"),
        (("--image", tmp_path / "in.png", "--strength", "1.5"), "--strength must be in [0, 1]"),
        (("--image", tmp_path / "in.png", "--strength", "-0.1"), "--strength must be in [0, 1]"),
    ):
        rc, _, err = _cli(capsys, *base, *args)
        assert rc == 2 and msg in err and len(err.splitlines()) == 1, err
        assert not (tmp_path / "o.png").exists()


class _StepNoiseZero(SeededNoise):
    """Seeded starting noise, but no fresh noise in the steps: the known region's, the jumps' (the test below
    compares two walks whose only randomness is then the shared start)."""

    def __call__(self, i: int, like: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(like)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny run with T = 20, exported to diffusers (diffusers' RePaint undo step adds one training step's
    noise per inference step, so it walks the grid's levels only with as many steps as T)."""
    pytest.importorskip("diffusers")
    from difflab.cli import main
    from difflab.config import TrainConfig
    from difflab.training.trainer import Trainer

    root = tmp_path_factory.mktemp("repaint")
    cfg = TrainConfig(data="digits", out=str(root / "run"), steps=2, batch_size=4, model="mnist-small",
                      channels_mult="32,64", sample_every=0, process="cosine", T=20, prediction="eps", warmup=1)
    Trainer(cfg, progress=False, log=lambda *a: None).run()
    assert main(["export", "--run", cfg.out, "--to", "diffusers", str(root / "hub")]) == 0
    return root / "hub"


@pytest.mark.parametrize("jump_length,resample", [(20, 1), (5, 3), (3, 2)])
def test_repaint_walks_as_diffusers_repaint_scheduler(exported, monkeypatch, jump_length, resample):
    """Our RePaint on an exported run is diffusers' RePaintScheduler (eta 0, the known region noised, jumps
    back up and down on the paper's schedule) step for step: same levels, same order, same images."""
    import diffusers
    from diffusers.schedulers import scheduling_repaint

    from difflab import editing
    from difflab.interop import load_diffusers_unet

    den, shape = load_diffusers_unet(exported)
    unet = diffusers.UNet2DModel.from_pretrained(exported / "unet").eval()
    sched = diffusers.RePaintScheduler.from_pretrained(exported / "scheduler", eta=0.0, clip_sample=False)

    images = torch.rand(2, *shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    mask = torch.zeros(1, 1, *shape[1:], dtype=torch.bool)
    mask[..., 2:6, 1:5] = True  # repaint a square
    abar = sched.alphas_cumprod.double()
    sigmas = torch.cat([((1 - abar) / abar).sqrt().flip(0), torch.zeros(1, dtype=torch.float64)]).float()
    seeds = sample_seeds(0, 2)
    monkeypatch.setattr(editing, "SeededNoise", _StepNoiseZero)
    ours = editing.repaint(den, images, mask, sigmas, seeds, sampler="ddim", jump_length=jump_length, resample=resample)

    monkeypatch.setattr(scheduling_repaint, "randn_tensor", lambda shape, **kw: torch.zeros(shape, dtype=kw.get("dtype")))
    sched.set_timesteps(20, jump_length=jump_length, jump_n_sample=resample)
    top = float(abar[-1].sqrt())  # the start: ours noised to the top, its known region replaced at the first call
    start = editing._start(den, images, sigmas, 0, seeds) * top
    x, keep = torch.where(mask, start, top * images), (~mask).float()
    t_last = int(sched.timesteps[0]) + 1
    with torch.no_grad():
        for t in sched.timesteps.tolist():
            if t < t_last:
                x = sched.step(unet(x, t).sample, t, x, images, keep).prev_sample
            else:
                x = sched.undo_step(x, t_last)
            t_last = t
    assert len(sched.timesteps) == 20 + (resample - 1) * jump_length * 2 * ((20 - 1) // jump_length)
    assert torch.allclose(ours, x, atol=2e-4), float((ours - x).abs().max())
    assert float((ours - images).abs()[mask.expand_as(images)].mean()) > 0.05  # the square was repainted


def test_repaint_defaults_are_the_measured_ones(model):
    """With a mask and nothing else, Model.edit repaints as editing.REPAINT_DEFAULTS says (bench/RESULTS.md)."""
    from difflab.editing import REPAINT_DEFAULTS

    x, mask = digits(2), torch.zeros(8, 8, dtype=torch.bool)
    mask[4:] = True
    assert REPAINT_DEFAULTS == {"sampler": "ddpm", "steps": 50, "resample": 4}
    assert torch.equal(model.edit(x, mask=mask, seed=3), model.edit(x, mask=mask, seed=3, **REPAINT_DEFAULTS))
    assert not torch.equal(model.edit(x, mask=mask, seed=3), model.edit(x, mask=mask, seed=3, resample=1))
