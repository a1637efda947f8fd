"""Rectified flow as a Gaussian process (issue 26): z_t = (1 - t) x + t s, the velocity target, logit-normal
training times with SD3's shift, and sampling from pure noise at t = 1 (sigma_ve = inf)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from difflab.denoiser import Denoiser
from difflab.methods.noise_levels import training_times
from difflab.processes import make_process
from difflab.samplers import FROM_PURE_NOISE, SAMPLERS, generate, sampler_sigmas

MU, STD = 0.3, 0.5  # data N(MU, STD^2) per pixel


K, SHIFT = 3, 0.4  # classes of the conditional model: class c has mean MU + SHIFT c; label K is the null


class GaussianVelocity(torch.nn.Module):
    """The exact velocity E[s - x | z_t] of N(MU, STD^2) data on the flow process, called as a network
    (z, 1000 t); as diffusers calls a transformer with timestep = 1000 sigma. With class labels the data
    of class c is N(MU + SHIFT c, STD^2) (the null label: the mean of the class means)."""

    def forward(self, z, t_net, class_labels=None):
        t = (t_net.double() / 1000).reshape(-1, *[1] * (z.ndim - 1))
        mu = torch.full_like(t, MU)
        if class_labels is not None:
            c = torch.where(class_labels == K, (K - 1) / 2, class_labels.double())
            mu = MU + SHIFT * c.reshape(t.shape)
        a, b = 1 - t, t
        x0 = mu + a * STD**2 * (z.double() - a * mu) / (a**2 * STD**2 + b**2)
        return ((z.double() - x0) / b).to(z.dtype)


def flow():
    return make_process({"kind": "flow"})


def test_marginal_by_simulation():
    p = flow()
    g = torch.Generator().manual_seed(0)
    x = MU + STD * torch.randn(200_000, generator=g, dtype=torch.float64)
    for t in (0.1, 0.5, 0.9):
        z = p.marginal(x, torch.full((len(x),), t, dtype=torch.float64), torch.randn(len(x), generator=g, dtype=torch.float64))
        assert abs(float(z.mean()) - (1 - t) * MU) < 0.01
        assert abs(float(z.std()) - math.sqrt(((1 - t) * STD) ** 2 + t**2)) < 0.01


def test_sigma_and_time_are_inverses_up_to_pure_noise():
    p = flow()
    t = torch.tensor([1e-3, 0.25, 0.5, 0.9, 0.999, 1.0], dtype=torch.float64)
    sigma = p.sigma_ve(t)
    assert torch.allclose(sigma[:-1], t[:-1] / (1 - t[:-1]), rtol=1e-12)
    assert math.isinf(float(sigma[-1]))
    assert torch.allclose(p.t_of(sigma), t, rtol=1e-12, atol=0)
    assert torch.allclose(p.signal_scale(t), 1 - t) and torch.allclose(p.noise_scale(t), t)
    assert make_process(p.config()).config() == {"kind": "flow", "t_min": 1e-3}


def test_velocity_prediction_against_its_definition():
    p = flow()
    g = torch.Generator().manual_seed(1)
    out = torch.randn(3, 1, 4, 4, generator=g, dtype=torch.float64)

    class Fixed(torch.nn.Module):
        def forward(self, z, t_net):
            return out

    den = Denoiser(Fixed(), p, "velocity")
    t = torch.tensor([0.2, 0.7, 1.0], dtype=torch.float64)
    z = torch.randn(3, 1, 4, 4, generator=g, dtype=torch.float64)
    sigma = p.sigma_ve(t)
    held = torch.where(torch.isinf(sigma), 1.0, 1 / (1 - t)).view(-1, 1, 1, 1)  # y, or y / sigma = z at t = 1
    x0 = den(z * held, sigma)
    assert torch.allclose(x0, z - t.view(-1, 1, 1, 1) * out, atol=1e-12)  # x0 = z_t - t v
    assert torch.allclose(den.x0_per_output(sigma, t), -t)
    x, s = torch.randn(2, 3, generator=g, dtype=torch.float64), torch.randn(2, 3, generator=g, dtype=torch.float64)
    assert torch.equal(den.target(x, s, t[:2]), s - x)


def test_logit_normal_quantiles_and_sd3_shift():
    p = flow()
    u = torch.tensor([0.025, 0.16, 0.5, 0.84, 0.975], dtype=torch.float64)
    n = math.sqrt(2) * torch.erfinv(2 * u - 1)
    for mean, std in ((0.0, 1.0), (0.5, 0.7)):
        t = training_times(p, u, "logit-normal", mean, std)
        assert torch.allclose(t, torch.sigmoid(mean + std * n), rtol=1e-12)
    t1 = training_times(p, u, "logit-normal")
    t3 = training_times(p, u, "logit-normal", shift=3.0)
    assert torch.allclose(t3, 3 * t1 / (1 + 2 * t1), rtol=1e-12)  # SD3's t' = shift t / (1 + (shift - 1) t)
    assert float(training_times(p, torch.zeros(1, dtype=torch.float64))) < 1  # never t = 1 (sigma_ve = inf)
    vp = make_process({"kind": "vp"})  # the same noise levels on any process
    assert torch.allclose(vp.sigma_ve(training_times(vp, u[1:4], "logit-normal")), torch.exp(n[1:4]), rtol=1e-6)
    shifted = vp.sigma_ve(training_times(vp, u[1:4], "logit-normal", shift=2.0))
    assert torch.allclose(shifted, 2 * torch.exp(n[1:4]), rtol=1e-6)  # the shift multiplies sigma_ve


def test_flow_config_defaults_and_refusals():
    from difflab.errors import UsageError
    from difflab.recipe import build_config

    cfg = build_config({"process": "flow"}).validate()
    assert (cfg.prediction, cfg.noise_sampling) == ("velocity", "logit-normal")
    assert build_config({"process": "flow", "prediction": "x0"}).validate().prediction == "x0"
    with pytest.raises(UsageError, match="cannot take --prediction eps"):
        build_config({"process": "flow", "prediction": "eps"}).validate()


def _den():
    return Denoiser(GaussianVelocity(), flow(), "velocity")


def test_euler_from_pure_noise_is_ddim_step_for_step():
    den = _den()
    sig = sampler_sigmas(den.process, "euler", 6, "uniform").double()
    assert math.isinf(float(sig[0]))
    noise = torch.randn(4, 1, 3, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    paths = {}
    for name in ("euler", "ddim"):
        seen = []
        SAMPLERS[name](den, noise.clone(), sig, callback=lambda info, seen=seen: seen.append(info["x"].clone()))
        paths[name] = seen
    for a, b in zip(paths["euler"], paths["ddim"]):
        assert torch.allclose(a, b, atol=1e-12)
    # the first step: x0_hat = z_1 - v, then y' = x0_hat + sigma' z_1
    v = GaussianVelocity()(noise, torch.full((4,), 1000.0))
    assert torch.allclose(paths["ddim"][0], noise - v + float(sig[1]) * noise, atol=1e-12)


@pytest.mark.parametrize("name,spacing", [(name, None) for name in SAMPLERS] + [(name, "uniform") for name in FROM_PURE_NOISE])
def test_every_sampler_draws_the_gaussian_data(name, spacing):
    """Each sampler on its own grid (the uniform grid of the flow's time starts at t = 1 for DDIM and
    DDPM, at SIGMA_TOP for the SDE samplers), and the samplers that take t = 1 on that grid."""
    opts = {"steps_per_level": 20, "step_scale": 1e-4} if name == "langevin" else {}  # as in test_guidance
    x = generate(_den(), 2000, (1, 1, 1), sampler=name, steps=30, spacing=spacing, seed=3, **opts).double()
    assert torch.isfinite(x).all()
    assert abs(float(x.mean()) - MU) < 0.06, float(x.mean())
    assert abs(float(x.std()) - STD) < 0.08, float(x.std())


def test_euler_equals_diffusers_flow_match_euler():
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.FlowMatchEulerDiscreteScheduler()
    steps = 8
    sched.set_timesteps(steps)
    net = GaussianVelocity()
    noise = torch.randn(4, 1, 4, 4, generator=torch.Generator().manual_seed(5))
    x = noise.clone()
    for t in sched.timesteps:
        x = sched.step(net(x, t.expand(len(x))), t, x).prev_sample
    ours = generate(_den(), 4, (1, 4, 4), sampler="euler", steps=steps, spacing="uniform", init_noise=noise)
    assert float((ours - x).abs().max()) < 1e-5


# --- a trained flow run ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def flow_run(tmp_path_factory):
    from difflab.recipe import build_config
    from difflab.training.trainer import Trainer

    out = tmp_path_factory.mktemp("flow") / "run"
    cfg = build_config({"data": "digits", "out": str(out), "process": "flow", "model": "mnist-small",
                              "channels_mult": "32,64", "steps": 6, "batch_size": 8, "log_every": 3,
                              "checkpoint_every": 6, "sample_every": 0, "sample_steps": 2, "warmup": 1,
                              "lr": 3e-3}).validate()
    Trainer(cfg, progress=False, log=lambda *a: None).run()
    return out


def test_a_flow_run_samples_with_every_sampler(flow_run):
    from difflab.runs.draw import load_run

    run = load_run(flow_run)
    assert (run.cfg.prediction, run.cfg.noise_sampling) == ("velocity", "logit-normal")
    for name in SAMPLERS:
        for spacing in ("uniform", None):
            x = run.sample(2, sampler=name, steps=4, spacing=spacing, autoguidance=1.0)
            assert x.shape == (2, 1, 8, 8) and x.dtype == torch.uint8, name
            if name in FROM_PURE_NOISE and spacing == "uniform":  # the steps from t = 1 give images, not a blank
                assert float(x.float().std()) > 0, name


def test_a_flow_run_edits_and_repaints_from_pure_noise(flow_run):
    """RePaint's walk starts at t = 1 on the flow process: the kept pixels are then the noise alone (held as
    y / sigma), not the image plus infinite noise, which a network reading every pixel turns to NaN."""
    import difflab

    model = difflab.load(flow_run)
    images = model.sample(3, seed=0)
    mask = torch.zeros(8, 8, dtype=torch.bool)
    mask[4:] = True
    outputs = {"repaint": model.edit(images, mask=mask, seed=1, steps=6, resample=2, jump_length=2),
               "sdedit": model.edit(images, strength=1.0, seed=1, steps=4),
               "repaint, the run's sampler": model.edit(images, mask=mask, seed=1, sampler="ddim", steps=4)}
    for what, out in outputs.items():
        assert out.shape == images.shape and out.dtype == torch.uint8, what
        assert torch.equal(out[..., :4, :], images[..., :4, :]) or what == "sdedit", what
    drawn = outputs["repaint"][..., 4:, :].float()
    assert float(drawn.std()) > 0 and not torch.equal(drawn, images[..., 4:, :].float())


def _save_noise(folder, noise):
    np.save(folder / "noise.npy", noise.numpy())
    return folder / "noise.npy"


def test_exported_flow_folder_samples_equal_difflab(flow_run, tmp_path):
    diffusers = pytest.importorskip("diffusers")
    import numpy as np

    from difflab.cli import main
    from difflab.runs.draw import load_run

    assert main(["export", "--run", str(flow_run), "--to", "diffusers", str(tmp_path / "hub")]) == 0
    pipe = diffusers.DDPMPipeline.from_pretrained(tmp_path / "hub")
    assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    ref = pipe(batch_size=4, generator=torch.Generator().manual_seed(0), num_inference_steps=10, output_type="np").images
    noise = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    ours = load_run(flow_run).sample(4, sampler="euler", steps=10, spacing="uniform", clip="none", autoguidance=1.0,
                                     init_noise=noise)
    want = torch.from_numpy(np.round(ref * 255)).permute(0, 3, 1, 2).int()
    assert int((ours.int() - want).abs().max()) <= 1
    # the folder read back: diffusers' own loop, and difflab's grids on the same network
    from difflab.figures import to_uint8
    from difflab.interop import generate_like_diffusers, load_diffusers_unet

    den, shape = load_diffusers_unet(tmp_path / "hub")
    assert shape == (1, 8, 8) and den.prediction == "velocity" and den.process.config() == {"kind": "flow", "t_min": 1e-3}
    theirs = to_uint8(generate_like_diffusers(den, 4, shape, sampler="euler", steps=10, init_noise=noise)).int()
    assert int((theirs - want).abs().max()) <= 1
    again = to_uint8(generate(den, 4, shape, sampler="euler", steps=10, spacing="uniform", init_noise=noise)).int()
    assert int((again - ours.int()).abs().max()) <= 1
    from difflab.errors import UsageError

    ddim = to_uint8(generate_like_diffusers(den, 4, shape, sampler="ddim", steps=10, init_noise=noise)).int()
    assert int((ddim - want).abs().max()) <= 1  # (a folder's default sampler)
    with pytest.raises(UsageError, match="flow-matching folder samples with euler or ddim"):
        generate_like_diffusers(den, 1, shape, sampler="heun", steps=4)
    npz = tmp_path / "s.npz"  # difflab sample --diffusers-model: the folder's default sampler, diffusers' grid
    code = main(["sample", "--diffusers-model", str(tmp_path / "hub"), "--steps", "10", "--n", "4",
                 "--init-noise", str(_save_noise(tmp_path, noise)), "--save-npz", str(npz), "--out", str(tmp_path / "g.png")])
    assert code == 0
    got = torch.from_numpy(np.load(npz)["images"]).permute(0, 3, 1, 2).int()
    assert int((got - want).abs().max()) <= 1
    with pytest.raises(UsageError, match="shift=3.0"):
        from difflab.interop.schedulers import flow_process

        flow_process({"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0})


def test_guidance_on_the_flow_process_starts_from_pure_noise():
    from difflab.guidance import Autoguidance, ClassifierFreeGuidance

    den, n = _den(), 6
    labels = {"class_labels": torch.tensor([0, 1, 2, 0, 1, 2])}
    cfg = ClassifierFreeGuidance(den, {"class_labels": torch.full((n,), K)}, 3.0)
    x = torch.randn(n, 1, 2, 2, dtype=torch.float64)
    inf = torch.full((n,), math.inf, dtype=torch.float64)
    # at t = 1 each estimate is its mean: m_null + g (m_c - m_null)
    want = MU + SHIFT * (1 + 3.0 * (labels["class_labels"].double() - 1))
    assert torch.allclose(cfg(x, inf, labels), want.view(-1, 1, 1, 1).expand(n, 1, 2, 2), atol=1e-12)
    cond_fn = lambda sl: {"class_labels": labels["class_labels"][sl]}  # noqa: E731
    plain = generate(den, n, (1, 2, 2), seed=1, sampler="ddim", steps=8, cond_fn=cond_fn)
    same = generate(ClassifierFreeGuidance(den, {"class_labels": torch.full((n,), K)}, 1.0), n, (1, 2, 2), seed=1,
                    sampler="ddim", steps=8, cond_fn=cond_fn)
    assert torch.equal(plain, same)  # g = 1 is plain conditional sampling
    guided = generate(cfg, n, (1, 8, 8), seed=1, sampler="euler", steps=20, spacing="uniform", batch_size=n,
                      cond_fn=lambda sl: {"class_labels": torch.full((n,), 2)})
    assert float(guided.mean()) > MU + 2 * SHIFT + 0.3  # pushed past the class's own mean, away from the null
    bad = Denoiser(GaussianVelocity(), flow(), "x0")  # a guide that predicts the raw velocity as x0
    auto = Autoguidance(den, bad, 2.0, (1.0, 20.0))
    assert torch.equal(auto(x, inf), den(x, inf))  # outside the guide's interval: the network alone
    assert torch.isfinite(generate(auto, 4, (1, 2, 2), sampler="ddim", steps=8)).all()


def test_inversion_round_trip_from_pure_noise():
    from difflab.latents import invert, reconstruct

    den = _den()
    x0 = (MU + STD * torch.randn(4, 1, 3, 3, generator=torch.Generator().manual_seed(4))).double()
    latent = invert(den, x0, 20, refine=30)
    assert torch.isfinite(latent).all() and abs(float(latent.std()) - 1) < 0.4  # the noise z_1 = s
    back = reconstruct(den, latent, 20)
    assert float((back - x0).abs().max()) < 1e-9  # exact with the refined steps, the one to t = 1 included


def test_likelihood_equals_the_gaussian_and_the_vp_process():
    from difflab.analytic import GaussianDataNet, gaussian_bpd
    from difflab.likelihood import log_likelihood

    x = (MU + STD * torch.randn(3, 1, 2, 2, generator=torch.Generator().manual_seed(6))).double()
    dims = x[0].numel()
    exact = gaussian_bpd(MU, STD, x)
    flow_bpd = -log_likelihood(_den(), x, steps=64, exact=True) / (dims * math.log(2))
    vp = make_process({"kind": "vp"})
    vp_bpd = -log_likelihood(Denoiser(GaussianDataNet(vp, MU, STD), vp, "eps"), x, steps=64, exact=True) / (dims * math.log(2))
    assert torch.isfinite(flow_bpd).all()
    assert abs(float(flow_bpd.mean()) - exact) < 2e-3, (float(flow_bpd.mean()), exact)
    assert torch.allclose(flow_bpd, vp_bpd, atol=2e-3)  # the same data, the same ODE in VE coordinates


def test_the_explorer_draws_a_flow_run_from_pure_noise(flow_run):
    import threading

    from serve_helpers import events, png_array, request

    from difflab.runs.draw import load_run
    from difflab.serve import ExplorerServer

    srv = ExplorerServer(flow_run.parent, "127.0.0.1", 0)
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    try:
        status, answer = request(srv, "/api/sample", {"run": flow_run.name, "sampler": "ddim", "steps": 4, "count": 3,
                                                     "seed": 2})
        assert status == 202, answer
        evs = events(srv, answer["job"])
    finally:
        srv.shutdown()
        srv.server_close()
    steps = [e for e in evs if e["type"] == "step"]
    assert len(steps) == 4 and steps[0]["sigma"] is None  # t = 1: JSON has no infinity
    assert all(math.isfinite(e["sigma"]) for e in steps[1:])
    images = np.stack([png_array(e["png"]) for e in evs if e["type"] == "image"])
    assert np.array_equal(images, load_run(flow_run).sample(3, seed=2, steps=4, sampler="ddim").numpy())


def test_cli_likelihood_of_a_flow_run(flow_run, tmp_path, capsys):
    import json

    from difflab.cli import main

    code = main(["likelihood", "--run", str(flow_run), "--data", "digits", "--split", "test", "--n", "4", "--steps", "2",
                 "--json", str(tmp_path / "bpd.json")])
    assert code == 0, capsys.readouterr().err
    bpd = json.loads((tmp_path / "bpd.json").read_text())["bits_per_dim"]
    assert math.isfinite(bpd) and 7 < bpd < 64


def test_a_class_conditional_flow_run_samples_with_guidance(tmp_path):
    from difflab.recipe import build_config
    from difflab.runs.draw import load_run
    from difflab.training.trainer import Trainer

    cfg = build_config({"data": "digits", "out": str(tmp_path / "run"), "process": "flow", "model": "tiny",
                              "conditioning": "class", "steps": 4, "batch_size": 8, "log_every": 2, "checkpoint_every": 4,
                              "sample_every": 0, "sample_steps": 3, "warmup": 1, "lr": 1e-3}).validate()
    Trainer(cfg, progress=False, log=lambda *a: None).run()
    run = load_run(tmp_path / "run")
    labels = torch.tensor([0, 3, 7])
    for sampler, spacing in (("ddim", None), ("euler", "uniform"), ("dpmpp-2m", None)):
        plain = run.sample(3, sampler=sampler, steps=4, spacing=spacing, labels=labels, guidance=1.0)
        guided = run.sample(3, sampler=sampler, steps=4, spacing=spacing, labels=labels, guidance=3.0)
        assert plain.shape == guided.shape == (3, 1, 8, 8) and not torch.equal(plain, guided), sampler
