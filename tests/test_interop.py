"""diffusers folders in difflab: every scheduler loop's images equal diffusers' own (same noise, uint8)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from difflab.figures import to_uint8

diffusers = pytest.importorskip("diffusers")

SPACINGS = ("leading", "linspace", "trailing")
SAMPLERS = ("ddpm", "ddim", "euler", "heun", "dpmpp-2m")


def tiny_unet(num_classes: int | None = None):
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                                 block_out_channels=(8, 16), norm_num_groups=4,
                                 down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"), num_class_embeds=num_classes)
    with torch.no_grad():  # a random net predicts near-zero noise; make its outputs matter
        for p in unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return unet.eval()


def save_folder(folder, unet, sched, pipeline: bool):
    if pipeline:
        diffusers.DDPMPipeline(unet=unet, scheduler=sched).save_pretrained(folder)
    else:
        unet.save_pretrained(folder)
        sched.save_pretrained(folder)


def diffusers_loop(unet, sched, noise, steps, sampler, generator=None, labels=None):
    """diffusers' own sampling loop (what its pipelines do) for the scheduler of ``sampler``."""
    sched.set_timesteps(steps)
    x = noise * sched.init_noise_sigma
    with torch.no_grad():
        for t in sched.timesteps:
            out = unet(sched.scale_model_input(x, t), t, class_labels=labels).sample
            kw = {"generator": generator} if sampler in ("ddpm",) else {}
            if sampler == "ddim":
                kw = {"eta": 0.0, "use_clipped_model_output": True}
            x = sched.step(out, t, x, **kw).prev_sample
    return x


def reference_scheduler(sampler, config):
    from difflab.interop.schedulers import make_scheduler

    return make_scheduler(config, sampler, 1)  # the same class and settings difflab's plan reads


def difflab_images(folder, sampler, steps, noise, ddpm_seed=None, labels=None):
    from difflab.interop import generate_like_diffusers, load_diffusers_unet
    from difflab.samplers import SAMPLERS

    den, shape = load_diffusers_unet(folder)
    cond = {"class_labels": labels} if labels is not None else None
    if sampler == "ddpm":  # the same fresh noise per step as diffusers' generator
        plan = den.plan_for(sampler, steps)
        den = den.planned(plan)
        g = torch.Generator().manual_seed(ddpm_seed)
        return SAMPLERS["ddpm"](den, noise * plan.prior, plan.sigmas, cond=cond,
                                noise=lambda i, like: torch.randn(like.shape, generator=g), **plan.options)
    return generate_like_diffusers(den, len(noise), shape, sampler=sampler, steps=steps, init_noise=noise,
                                   cond_fn=(lambda sl: cond) if cond else None)


def compare(ours, ref):
    a, b = to_uint8(ours).int(), to_uint8(ref).int()
    return int((a - b).abs().max()), float((a != b).float().mean())


# diffusers' DDIM with linspace spacing steps from tau to tau - T // K and then evaluates the UNet at the
# next listed timestep, as if its sample were at that level: not a grid (DDIM's `landing` option follows it)
CASES = [(s, sp) for s in SAMPLERS for sp in SPACINGS]


@pytest.mark.parametrize("sampler,spacing", CASES)
def test_images_equal_diffusers_loop(tmp_path, sampler, spacing):
    unet = tiny_unet()
    config = {"timestep_spacing": spacing, "steps_offset": 1 if spacing == "leading" else 0,
              "clip_sample": sampler in ("ddpm", "ddim"), "set_alpha_to_one": spacing != "trailing",
              "beta_schedule": "scaled_linear" if spacing == "linspace" else "linear",
              "beta_start": 0.00085 if spacing == "linspace" else 1e-4,
              "beta_end": 0.012 if spacing == "linspace" else 0.02}
    sched = diffusers.DDIMScheduler(**config)
    save_folder(tmp_path, unet, sched, pipeline=spacing == "trailing")
    steps = 10
    noise = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    ref_sched = reference_scheduler(sampler, json.loads((
        tmp_path / ("scheduler/scheduler_config.json" if spacing == "trailing" else "scheduler_config.json")
    ).read_text()))
    ref = diffusers_loop(unet, ref_sched, noise, steps, sampler, torch.Generator().manual_seed(9))
    ours = difflab_images(tmp_path, sampler, steps, noise, ddpm_seed=9)
    worst, frac = compare(ours, ref)
    assert worst <= 1 and frac < 0.02, (worst, frac)


def test_class_conditional_bare_folder_without_scheduler_config(tmp_path):
    unet = tiny_unet(num_classes=3)
    unet.save_pretrained(tmp_path)  # no scheduler_config.json: DDPM's defaults (linear betas, clipping)
    noise = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 1, 2])
    ref_sched = reference_scheduler("ddim", {})
    ref = diffusers_loop(unet, ref_sched, noise, 8, "ddim", labels=labels)
    worst, _ = compare(difflab_images(tmp_path, "ddim", 8, noise, labels=labels), ref)
    assert worst <= 1
    from difflab.errors import UsageError
    from difflab.interop import load_diffusers_unet

    den, shape = load_diffusers_unet(tmp_path)
    with pytest.raises(UsageError, match="give --class"):
        den(noise, torch.full((3,), 2.0))


def test_cli_sample_honours_the_folder_scheduler(tmp_path, capsys):
    """The issue's case: DDIMScheduler defaults (leading spacing) in a saved folder, 20 DDIM steps."""
    from difflab.cli import main

    unet = tiny_unet()
    sched = diffusers.DDIMScheduler(clip_sample=False)
    save_folder(tmp_path / "model", unet, sched, pipeline=True)
    noise = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(7))
    np.save(tmp_path / "noise.npy", noise.numpy())
    code = main(["sample", "--diffusers-model", str(tmp_path / "model"), "--sampler", "ddim", "--steps", "20",
                 "--eta", "0", "--init-noise", str(tmp_path / "noise.npy"), "--n", "4",
                 "--save-npz", str(tmp_path / "s.npz")])
    assert code == 0, capsys.readouterr().err
    got = torch.from_numpy(np.load(tmp_path / "s.npz")["images"]).permute(0, 3, 1, 2).int()
    want = to_uint8(diffusers_loop(unet, sched, noise, 20, "ddim")).int()
    assert int((got - want).abs().max()) <= 1


def _strip_rows(path, n, size=8, pad=2):
    """The two rows of a ``difflab invert`` strip (originals, reconstructions) as uint8 [2, n, H, W]."""
    from PIL import Image

    a = np.asarray(Image.open(path))[::2, ::2]  # the strip is upscaled 2x
    return np.stack([[a[pad + r * (size + pad):][:size, pad + i * (size + pad):][:, :size] for i in range(n)]
                     for r in range(2)])


def test_invert_a_folder_and_decode_with_the_printed_command(tmp_path, capsys):
    """invert --diffusers-model: the latents it saves, decoded by the 'difflab sample' line it prints,
    are its own reconstructions (class-conditional: the digits' own labels)."""
    from difflab.cli import main

    tiny_unet(num_classes=10).save_pretrained(tmp_path / "m")
    diffusers.DDIMScheduler(clip_sample=False).save_pretrained(tmp_path / "m")
    code = main(["invert", "--diffusers-model", str(tmp_path / "m"), "--data", "digits", "--n", "4", "--steps", "8",
                 "--out", str(tmp_path / "inv.png"), "--save-latents", str(tmp_path / "z.npy")])
    out = capsys.readouterr().out
    assert code == 0 and "PSNR" in out
    decode = next(line for line in out.splitlines() if line.startswith("latents:")).split("decode with difflab ")[1]
    assert "--spacing uniform" in decode  # the folder's own scheduler grid would be another one
    from difflab.data import load

    label = int(load("digits", split="test").labels[0])  # the command samples one class: the first image's
    argv = decode.rstrip(")").split() + ["--save-npz", str(tmp_path / "d.npz"), "--class", str(label)]
    assert main(argv) == 0
    got = np.load(tmp_path / "d.npz")["images"][0, ..., 0].astype(int)
    recon = _strip_rows(tmp_path / "inv.png", 4)[1, 0].astype(int)
    assert np.abs(got - recon).max() <= 1


def test_likelihood_of_a_folder(tmp_path, capsys):
    import json as json_

    from difflab.cli import main
    from difflab.data import load
    from difflab.interop import load_diffusers_unet
    from difflab.likelihood import bits_per_dim

    tiny_unet().save_pretrained(tmp_path / "m")
    code = main(["likelihood", "--diffusers-model", str(tmp_path / "m"), "--data", "digits", "--n", "3",
                 "--steps", "4", "--json", str(tmp_path / "b.json")])
    assert code == 0, capsys.readouterr().err
    res = json_.loads((tmp_path / "b.json").read_text())
    den, _ = load_diffusers_unet(tmp_path / "m")
    want = bits_per_dim(den, load("digits", split="test").images[:3], steps=4, seed=0)
    assert res["diffusers_model"] == str(tmp_path / "m") and "run" not in res
    assert res["bits_per_dim"] == pytest.approx(float(want.mean()), rel=1e-6) and 0 < res["bits_per_dim"] < 64


@pytest.mark.parametrize("argv,why", [
    (["invert", "--data", "digits"], "exactly one of --run DIR or --diffusers-model"),
    (["likelihood", "--run", "{m}", "--diffusers-model", "{m}"], "exactly one of --run DIR or --diffusers-model"),
    (["likelihood", "--diffusers-model", "{m}"], "--data"),
    (["invert", "--diffusers-model", "{m}", "--data", "digits"], "--out"),
    (["evaluate", "--diffusers-model", "{m}"], "--data"),
    (["evaluate", "--diffusers-model", "{m}", "--samples", "{m}", "--data", "digits"], "exactly one of"),
    (["likelihood", "--diffusers-model", "{c}", "--data", "{m}", "--n", "1"], "class-conditional"),
])
def test_folder_commands_refuse_with_one_line(tmp_path, capsys, argv, why):
    from PIL import Image

    from difflab.cli import main

    tiny_unet().save_pretrained(tmp_path / "m")
    tiny_unet(num_classes=3).save_pretrained(tmp_path / "c")
    Image.new("L", (8, 8)).save(tmp_path / "m" / "x.png")  # an unlabelled image folder (no classes)
    argv = [a.format(m=tmp_path / "m", c=tmp_path / "c") for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and why in err, err


def test_sampling_a_folder_leaves_its_likelihood_alone(tmp_path):
    """The scheduler's plan (grid, timesteps, clipping) belongs to one draw: a likelihood after a sample
    runs on the plain denoiser, as on a freshly loaded folder."""
    import difflab

    save_folder(tmp_path, tiny_unet(), diffusers.DDIMScheduler(clip_sample=True, clip_sample_range=0.05), pipeline=False)
    images = torch.randint(0, 256, (2, 1, 8, 8), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    fresh = difflab.load(tmp_path).likelihood(images, steps=2)
    model = difflab.load(tmp_path)
    model.sample(2, steps=3)
    assert torch.equal(model.likelihood(images, steps=2), fresh)
