"""Consistency tuning (ECT) and the consistency sampler: checked against the closed form for Gaussian data, where
the consistency function of N(mu, s^2) data is f(x, sigma) = mu + (x - mu) s / sqrt(s^2 + sigma^2), then end to
end on a tiny run (difflab distill, the tuned run drawn by difflab sample and the API)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from difflab.analytic import GaussianDataNet
from difflab.denoiser import Denoiser
from difflab.distill import DROPOUT
from difflab.methods.consistency import SIGMA_MID, Tuning, ect_loss, tuning_levels
from difflab.processes.continuous import make_process
from difflab.samplers import CONSISTENCY_SAMPLERS, SAMPLERS, generate, sampler_sigmas
from difflab.samplers.consistency import consistency_function, sample_consistency

MU, S = 0.3, 0.5


class ExactConsistency(nn.Module):
    """The exact consistency function of N(MU, S^2) data, with a denoiser's call signature."""

    def __init__(self, process):
        super().__init__()
        self.process = process

    def forward(self, x, sigma, cond=None):
        sigma = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, *[1] * (x.dim() - 1))
        return MU + (x - MU) * S / torch.sqrt(S**2 + sigma**2)


def _levels(*values):
    return torch.tensor([*values, 0.0], dtype=torch.float64)


def test_the_closed_form_is_where_the_exact_ode_ends():
    proc = make_process({"kind": "ve"})
    den = Denoiser(GaussianDataNet(proc, MU, S).double(), proc, "eps")  # the exact posterior mean E[x | y]
    x = torch.linspace(-3, 3, 7, dtype=torch.float64).view(-1, 1, 1, 1)
    sigma = 2.0
    end = SAMPLERS["heun"](den, x, torch.cat([torch.logspace(math.log10(sigma), -4, 200, dtype=torch.float64),
                                              torch.zeros(1, dtype=torch.float64)]))
    assert torch.allclose(end, ExactConsistency(proc)(x, sigma), atol=1e-3)  # (the network time is float32)


def test_the_sampler_with_the_exact_function_gives_exact_values_for_fixed_noise():
    f = ExactConsistency(make_process({"kind": "ve"}))
    x = torch.tensor([[[[1.7]]], [[[-40.0]]]], dtype=torch.float64)
    z = torch.tensor([[[[0.25]]], [[[-1.5]]]], dtype=torch.float64)
    one = sample_consistency(f, x, _levels(80.0))
    assert torch.allclose(one, MU + (x - MU) * S / math.sqrt(S**2 + 80**2), atol=1e-12)
    two = sample_consistency(f, x, _levels(80.0, 0.8), noise=lambda i, like: z)
    y = one + 0.8 * z
    assert torch.allclose(two, MU + (y - MU) * S / math.sqrt(S**2 + 0.64), atol=1e-12)
    seen = []
    sample_consistency(f, x, _levels(80.0, 0.8), noise=lambda i, like: z, callback=seen.append)
    assert [info["sigma"] for info in seen] == [80.0, 0.8] and torch.allclose(seen[0]["x0"], one)


@pytest.mark.parametrize("levels", [(80.0,), (80.0, 0.8), (80.0, 2.0, 0.3)])
def test_the_sampler_with_the_exact_function_draws_the_data_law(levels):
    f = ExactConsistency(make_process({"kind": "ve"}))
    g = torch.Generator().manual_seed(0)
    x = MU + math.sqrt(S**2 + levels[0] ** 2) * torch.randn(200_000, 1, 1, 1, generator=g, dtype=torch.float64)
    out = sample_consistency(f, x, _levels(*levels), noise=lambda i, like: torch.randn(like.shape, generator=g,
                                                                                      dtype=like.dtype))
    assert abs(float(out.mean()) - MU) < 0.004 and abs(float(out.std()) - S) < 0.004


def test_the_consistency_sampler_draws_through_generate_on_its_own_grid():
    proc = make_process({"kind": "discrete", "schedule": "cosine", "T": 1000})
    assert "consistency" in CONSISTENCY_SAMPLERS and "consistency" not in SAMPLERS  # (not a denoiser's sampler)
    grid = sampler_sigmas(proc, "consistency", 2, sigma_min=0.8)
    assert torch.allclose(grid, _levels(80.0, 0.8)) and torch.allclose(sampler_sigmas(proc, "consistency", 1),
                                                                       _levels(80.0))
    f = ExactConsistency(proc)  # from the prior's zero mean at 80, the 1-step draw is within S/80 of the law
    x = generate(f, 4000, (1, 1, 1), sampler="consistency", steps=2, sigma_min=0.8, seed=1).double()
    assert abs(float(x.mean()) - MU) < 0.03 and abs(float(x.std()) - S) < 0.03


def test_the_boundary_condition_holds_for_every_parameterisation():
    proc = make_process({"kind": "discrete", "schedule": "cosine", "T": 1000})
    net = GaussianDataNet(proc, MU, S)
    x = torch.randn(3, 1, 2, 2)
    sigma = torch.tensor([0.0, 0.5, 0.0])
    for prediction in ("x0", "eps"):  # (the eps network's output read as x0 too: f(x, 0) = x all the same)
        den = Denoiser(net, proc, prediction)
        out = consistency_function(den, x, sigma)
        assert torch.equal(out[[0, 2]], x[[0, 2]])
        assert torch.allclose(out[1], den(x[1:2], sigma[1:2])[0])


def test_the_mapping_function_shrinks_the_gap_each_stage():
    tuning = Tuning(stage_steps=10)
    t = torch.tensor([0.01, 0.5, 2.0, 10.0, 80.0], dtype=torch.float64)
    r0, r1, r5 = (tuning.r_of(t, step) for step in (0, 19, 55))
    assert float(r0[0]) == 0 and float(r0[-1]) > 0  # stage 0: small levels train on x itself
    n = 1 + 8 * torch.sigmoid(-t)
    assert torch.allclose(r1, (t * (1 - n / 4)).clamp_min(0)) and torch.allclose(r5, t * (1 - n / 64))
    assert bool((t - r5 < t - r1).all() and (r5 < t).all())
    u = torch.linspace(0.01, 0.99, 9, dtype=torch.float64)
    t, r = tuning_levels(tuning, u, 0, 0.002, 80.0)
    assert torch.allclose(t, torch.exp(-1.1 + 2.0 * math.sqrt(2) * torch.erfinv(2 * u - 1)).clamp(0.002, 80))


class GaussianFamily(nn.Module):
    """f(x, sigma) = MU + (x - MU) (S / sqrt(S^2 + sigma^2))^g: the exact denoiser (posterior mean) of N(MU, S^2)
    data at g = 2, its exact consistency function at g = 1."""

    def __init__(self):
        super().__init__()
        self.g = nn.Parameter(torch.tensor(2.0, dtype=torch.float64))

    def forward(self, x, sigma, cond=None):
        sigma = sigma.reshape(-1, *[1] * (x.dim() - 1)).to(x.dtype)
        return MU + (x - MU) * (S / torch.sqrt(S**2 + sigma**2)) ** self.g


def test_tuning_the_exact_denoiser_makes_it_the_consistency_function():
    """Started from the posterior mean (what a diffusion run learns), ECT's loss falls and the 2-step samples,
    far too narrow at first, reach the data law: g goes from 2 to 1."""
    f = GaussianFamily()
    tuning = Tuning(stage_steps=20)
    opt = torch.optim.Adam(f.parameters(), lr=0.02)
    g = torch.Generator().manual_seed(0)

    def batch(step, n=256):
        x = MU + S * torch.randn(n, 1, 1, 1, generator=g, dtype=torch.float64)
        u = torch.rand(n, generator=g, dtype=torch.float64).clamp(1e-6, 1 - 1e-6)
        t, r = tuning_levels(tuning, u, step, 0.002, 80.0)
        return x, t, r, torch.randn(x.shape, generator=g, dtype=torch.float64)

    def two_step_std():
        z = torch.randn(50_000, 1, 1, 1, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        with torch.no_grad():
            return float(sample_consistency(f, MU + 80 * z, _levels(80.0, 0.8), noise=lambda i, like: z.flip(0)).std())

    fixed = batch(150, n=50_000)  # the last stage's pairs
    with torch.no_grad():
        before = float(ect_loss(f, *fixed))
    std_before = two_step_std()
    for step in range(150):
        opt.zero_grad()
        ect_loss(f, *batch(step)).backward()
        opt.step()
    with torch.no_grad():
        after = float(ect_loss(f, *fixed))
    assert after < before and abs(float(f.g.detach()) - 1) < 0.15
    assert std_before < 0.25 and abs(two_step_std() - S) < 0.05


# --- end to end on a tiny run -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    from difflab.recipe import build_config
    from difflab.training.trainer import Trainer

    out = tmp_path_factory.mktemp("distill") / "base"
    cfg = build_config({"data": "digits", "out": str(out), "model": "mnist-small", "channels_mult": "16,32",
                        "steps": 4, "batch_size": 8, "log_every": 2, "checkpoint_every": 4, "sample_every": 0,
                        "sample_steps": 2, "warmup": 1, "lr": 3e-3, "ema_snapshot_every": 0})
    Trainer(cfg, progress=False, log=lambda *a: None).run()
    return out


def test_difflab_distill_end_to_end(base_run, tmp_path, capsys):
    import difflab
    from difflab.cli import main
    from difflab.runs.draw import load_run, request_evaluations
    from difflab.runs.request import SampleRequest

    out = tmp_path / "ect"
    args = ["distill", "--run", str(base_run), "--out", str(out), "--steps", "3", "--batch-size", "8", "--quiet",
            "--stage-steps", "2"]
    assert main(args) == 0
    assert (out / "samples" / "final.png").exists()
    info = json.loads((out / "distill.json").read_text())
    assert info["tuning"]["stage_steps"] == 2 and info["run_step"] == 4
    assert info["network"]["dropout"] == DROPOUT  # the base trained without: ECT tunes with dropout
    run = load_run(out)
    assert run.cfg.method == "consistency" and run.step == 3
    assert run.sampling_defaults() == {"steps": 2, "clip": "clip", "sigma_min": SIGMA_MID}
    assert request_evaluations(run, SampleRequest()) == 2
    a = difflab.load(out).sample(3, seed=1)
    assert a.shape == (3, 1, 8, 8) and a.dtype == torch.uint8
    assert torch.equal(a, run.sample(3, seed=1)) and not torch.equal(run.sample(3, seed=1, steps=1), a)
    assert main(["sample", "--run", str(out), "--n", "2", "--out", str(tmp_path / "g.png")]) == 0
    # resumed: the same run goes on
    assert main([*args[:5], "--steps", "5", "--resume", "--quiet"]) == 0
    assert load_run(out).step == 5
    _explorer_draws_it(tmp_path, load_run(out))
    capsys.readouterr()
    bad = {"a missing run": ["--run", str(tmp_path / "nope"), "--out", str(tmp_path / "x")],
           "a tuned run as the base": ["--run", str(out), "--out", str(tmp_path / "y")],
           "a Gaussian run as --out": ["--run", str(base_run), "--out", str(base_run)],
           "a tuned run without --resume": ["--run", str(base_run), "--out", str(out)],
           "a dropout of 1": ["--run", str(base_run), "--out", str(tmp_path / "z"), "--dropout", "1"],
           "a NaN dropout": ["--run", str(base_run), "--out", str(tmp_path / "z"), "--dropout", "nan"]}
    for what, flags in bad.items():
        assert main(["distill", *flags, "--steps", "1", "--quiet"]) == 2, what
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("difflab distill: error:"), (what, err)
    with pytest.raises(Exception, match="its own sampler"):
        run.sample(2, sampler="ddim")


def _explorer_draws_it(runs_dir, run):
    """The explorer's sample panel, with the run's own settings, draws what run.sample draws (2 steps)."""
    import numpy as np
    from serve_helpers import png_array

    from difflab.runs.request import SampleRequest
    from difflab.serve.catalog import Catalog
    from difflab.serve.jobs import Job
    from difflab.serve.panels import Panels

    job = Job("1", "sample", Panels(Catalog(runs_dir)).sample(SampleRequest(run="ect", n=3, seed=2)))
    job.work(job)
    start, *rest = job.events
    assert start["steps"] == 2, start
    images = np.stack([png_array(e["png"]) for e in rest if e["type"] == "image"])
    assert np.array_equal(images, run.sample(3, seed=2).numpy())


def test_the_tuned_network_starts_as_the_runs_denoiser(base_run):
    from difflab.distill import _from_base
    from difflab.methods.method import ConsistencyMethod
    from difflab.runs.draw import load_run
    from difflab.training.trainer import Trainer

    cfg, weights, network, step = _from_base(base_run, base_run.parent / "start", 1, None, None, 8, 2, 0.8, 0.0, None,
                                             None)
    assert network["dropout"] == cfg.dropout == 0.0  # as asked
    trainer = Trainer(cfg, progress=False, log=lambda *a: None, method=ConsistencyMethod(cfg, None, network),
                      initial=weights)
    trainer._release_lock()
    base = load_run(base_run)
    x, sigma = torch.randn(2, 1, 8, 8), torch.tensor([0.3, 5.0])
    f = trainer.method.consistency_function(trainer.ema.model.eval())
    assert torch.allclose(f(x, sigma), base.denoiser()(x, sigma), atol=1e-6)
    assert trainer.method.denoiser(trainer.net) is None  # not an ODE denoiser
