"""EDM2's power-function EMA: the profile formulas, the update rule, post-hoc reconstruction, the trainer's
snapshots and the ``difflab ema`` command."""

import contextlib
import io
import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy.integrate import quad

from difflab import recipe
from difflab.cli import main
from difflab.config import TrainConfig, load_run_config
from difflab.ema_lengths import SIGMA_REL_MAX, gamma_of_sigma_rel, parse_lengths, sigma_rel_of_gamma
from difflab.errors import UsageError
from difflab.nets import split_prefix
from difflab.runs.checkpoint import latest_checkpoint, list_checkpoints
from difflab.runs.draw import load_run
from difflab.runs.ema import PowerEMA, build_emas, posthoc_coefficients, power_profile, profile_inner
from difflab.runs.posthoc_ema import (
    guide_snapshot,
    load_guide,
    load_posthoc_ema,
    reconstruct_ema,
    save_posthoc_ema,
    save_snapshot,
)
from difflab.training.trainer import Trainer

quiet = dict(progress=False, log=lambda *a: None)


@pytest.mark.parametrize("gamma", [-0.3, 0.0, 1.5, 6.94, 16.97, 100.0])
def test_sigma_rel_is_the_profile_std_over_its_length(gamma):
    t = 7.0
    mass = quad(lambda u: power_profile(u, t, gamma), 0, t)[0]
    mean = quad(lambda u: u * power_profile(u, t, gamma), 0, t)[0]
    var = quad(lambda u: (u - mean) ** 2 * power_profile(u, t, gamma), 0, t)[0]
    assert mass == pytest.approx(1, abs=1e-7)
    assert sigma_rel_of_gamma(gamma) == pytest.approx(math.sqrt(var) / t, rel=1e-6)


@pytest.mark.parametrize("sigma_rel", [0.01, 0.05, 0.1, 0.2, 0.29, 0.3])
def test_gamma_of_sigma_rel_inverts_it(sigma_rel):
    gamma = gamma_of_sigma_rel(sigma_rel)
    assert gamma > -0.5  # the branch whose profiles are square-integrable
    assert sigma_rel_of_gamma(gamma) == pytest.approx(sigma_rel, rel=1e-9)


def test_edm2_reference_exponents_and_the_largest_length():
    assert gamma_of_sigma_rel(0.05) == pytest.approx(16.97, abs=0.01)  # EDM2 sec. 3.1
    assert gamma_of_sigma_rel(0.10) == pytest.approx(6.94, abs=0.01)
    scan = max(sigma_rel_of_gamma(g) for g in np.linspace(-0.99, 5, 200_001))
    assert SIGMA_REL_MAX == pytest.approx(scan, rel=1e-9) and SIGMA_REL_MAX > scan - 1e-12


@pytest.mark.parametrize("ta,ga,tb,gb", [(5.0, 2.0, 9.0, 0.5), (9.0, 16.97, 4.0, 6.94), (3.0, -0.3, 3.0, -0.3)])
def test_profile_inner_product_closed_form(ta, ga, tb, gb):
    numeric = quad(lambda u: power_profile(u, ta, ga) * power_profile(u, tb, gb), 0, min(ta, tb), limit=200)[0]
    assert profile_inner(ta, ga, tb, gb) == pytest.approx(numeric, rel=1e-7)
    assert profile_inner(1e6, 16.97, 2e6, 6.94) == pytest.approx(profile_inner(1, 16.97, 2, 6.94) / 1e6, rel=1e-9)


def test_power_ema_weights_are_the_profile_integrated_over_each_step():
    """After t updates with theta_i = e_i, the EMA is its weight vector: integral of p_t over [i-1, i]."""
    t = 40
    net = torch.nn.Linear(t, 1, bias=False)
    ema = PowerEMA(net, 0.1)
    with torch.no_grad():
        net.weight.fill_(123.0)  # the initial weights: must get no weight at all
        ema.model.weight.copy_(net.weight)
        for i in range(t):
            net.weight.zero_()
            net.weight[0, i] = 1
            ema.update(net)
    g = ema.gamma
    i = np.arange(1, t + 1)
    expected = (i ** (g + 1) - (i - 1) ** (g + 1)) / t ** (g + 1)
    np.testing.assert_allclose(ema.model.weight[0].double().numpy(), expected, atol=2e-7)


def test_posthoc_fit_is_exact_for_a_tracked_profile():
    t = np.array([100, 100, 200, 200, 300, 300.0])
    g = np.array([16.97, 6.94] * 3)
    x, err = posthoc_coefficients(t, g, 300, 6.94)
    assert err < 1e-6 and x[-1] == pytest.approx(1, abs=1e-6) and np.abs(x[:-1]).max() < 1e-6


def _tiny_training(steps=1000, every=50, folder=None):
    """A tiny MLP trained by noisy SGD with two tracked power EMAs (snapshots every ``every`` steps into
    ``folder``) and directly tracked EMAs of other lengths."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    w_true = torch.randn(4, 1)
    tracked = [PowerEMA(net, 0.05), PowerEMA(net, 0.10)]
    direct = {a: PowerEMA(net, a) for a in (0.03, 0.08, 0.15)}
    for step in range(1, steps + 1):
        x = torch.randn(8, 4)
        loss = ((net(x) - torch.sin(x @ w_true)) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        for e in [*tracked, *direct.values()]:
            e.update(net)
        if step % every == 0:
            save_snapshot(folder, step, tracked)
    return net, tracked, direct


def _flat(sd):
    return torch.cat([sd[k].double().flatten() for k in sorted(sd)])


def test_posthoc_reconstruction_matches_a_directly_tracked_ema(tmp_path, capsys):
    net, tracked, direct = _tiny_training(folder=tmp_path)
    assert len(list_checkpoints(tmp_path / "ema-snapshots")) == 20
    raw = _flat(net.state_dict())
    for a, limit in ((0.08, 5e-3), (0.03, 5e-2), (0.15, 2e-2)):  # inside and outside the tracked 0.05..0.10
        sd, info = reconstruct_ema(tmp_path, a)
        ref, rec = _flat(direct[a].state_dict()), _flat(sd)
        nearest = min((_flat(e.state_dict()) - ref).norm() for e in tracked)
        err = float((rec - ref).norm() / (ref - raw).norm())  # relative to how far the EMA is from the weights
        with capsys.disabled():
            print(f"\npost-hoc sigma_rel {a} from 0.05 + 0.10 (20 snapshots, 1000 steps): weight error "
                  f"{float((rec - ref).norm() / ref.norm()):.2e} of |theta_A|, {err:.2e} of |theta_A - theta|; "
                  f"nearest tracked EMA {float(nearest / (ref - raw).norm()):.2e}; profile fit error "
                  f"{info['profile_error']:.2e}")
        assert info["step"] == 1000 and info["snapshots"] == 20 and info["profiles"] == 40
        assert err < limit and err < 0.2 * float(nearest / (ref - raw).norm())
    # a saved post-hoc EMA is used while it is as new as the snapshots, and rebuilt when they changed
    js, info = save_posthoc_ema(tmp_path, 0.08)
    assert js == tmp_path / "ema" / "ema-0.080.json" and load_posthoc_ema(tmp_path, 0.08)[1] == json.loads(js.read_text())
    (tmp_path / "ema-snapshots" / "step-0001000.json").unlink()
    assert load_posthoc_ema(tmp_path, 0.08)[1]["step"] == 950
    with pytest.raises(UsageError, match="--force"):
        save_posthoc_ema(tmp_path, 0.08)


def test_lengths_are_checked():
    for bad in (0.0, -0.1, SIGMA_REL_MAX, 0.5, math.nan, math.inf):
        with pytest.raises(UsageError, match="--ema-length"):
            gamma_of_sigma_rel(bad)
    assert parse_lengths(" 0.05, 0.1 ") == [0.05, 0.1] and parse_lengths("") == []
    for text in ("0.05,x", "0.1,0.1", "0.05,0.4"):
        with pytest.raises(UsageError, match="--ema-track"):
            parse_lengths(text)
    with pytest.raises(UsageError, match="--ema-length"):
        TrainConfig(ema_length=0.31).validate()
    TrainConfig(ema_length=0.0).validate()  # 0: the classic EMA


def test_main_ema_is_shared_with_an_equal_tracked_length():
    net = torch.nn.Linear(2, 2)
    main, tracked = build_emas(net, 0.1, 0.999, [0.05, 0.1])
    assert isinstance(main, PowerEMA) and tracked[1] is main and tracked[0] is not main
    classic, _ = build_emas(net, 0.0, 0.99, [])
    assert not isinstance(classic, PowerEMA) and classic.decay == 0.99


# --- the trainer and the command line --------------------------------------------------------------------
def cfg(tmp_path, name="run", **kw):
    base = dict(data="digits", out=str(tmp_path / name), model="tiny", steps=12, batch_size=16, log_every=4,
                checkpoint_every=6, sample_every=0, sample_steps=4, warmup=2, lr=1e-3, ema_snapshot_every=4, ema_length=0.1)
    base.update(kw)
    return TrainConfig(**base)


def _cli(*args):
    """``difflab ARGS`` in this process (a subprocess would import torch again): (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny run (12 steps, snapshots every 4) shared by the tests that only read it."""
    tmp = tmp_path_factory.mktemp("ema")
    Trainer(cfg(tmp), **quiet).run()
    return tmp / "run"


def test_trainer_tracks_power_emas_and_snapshots_them(trained):
    snaps = list_checkpoints(trained / "ema-snapshots")
    assert [json.loads(p.read_text())["step"] for p in snaps] == [4, 6, 8, 12]  # every 4, and with each checkpoint
    meta = json.loads(snaps[-1].read_text())
    assert meta["ema_lengths"] == [0.05, 0.1] and meta["updates"] == [12, 12]
    tensors, ck = latest_checkpoint(trained / "checkpoints")
    assert ck["ema_updates"] == 12 and ck["ema_tracked_updates"] == [12]  # 0.1 is the main EMA, saved once
    main = split_prefix(tensors, "ema")
    # the main EMA (sigma_rel 0.1 at step 12) rebuilt from the snapshots is itself
    run = load_run(trained, ema_length=0.1)
    assert run.step == 12
    for k, v in run.net.state_dict().items():
        torch.testing.assert_close(v, main[k], atol=1e-5, rtol=1e-4)


def test_resume_rewrites_snapshots_after_the_checkpoint(tmp_path):
    Trainer(cfg(tmp_path, steps=12, keep=5), **quiet).run()
    folder = tmp_path / "run" / "ema-snapshots"
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    for p in (tmp_path / "run" / "checkpoints").glob("step-0000012.*"):
        p.unlink()  # as if killed after step 12's snapshot, before its checkpoint
    st = folder / "step-0000008.safetensors"
    st.write_bytes(st.read_bytes()[:-4] + b"junk")  # a stale snapshot must not survive the resume
    Trainer(cfg(tmp_path, steps=12, keep=5), resume=True, **quiet).run()
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_cli_ema_builds_saves_and_samples(trained, tmp_path):
    run_dir = trained
    r = _cli("ema", "--run", str(run_dir), "--ema-length", "0.08")
    assert r.returncode == 0, r.stderr
    saved = run_dir / "ema" / "ema-0.080.safetensors"
    assert saved.exists() and str(saved) in r.stdout
    before = saved.read_bytes()
    r = _cli("ema", "--run", str(run_dir), "--ema-length", "0.08")
    assert r.returncode == 2 and "--force" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert saved.read_bytes() == before
    assert _cli("ema", "--run", str(run_dir), "--ema-length", "0.08", "--force").returncode == 0
    built, _ = reconstruct_ema(run_dir, 0.08)  # sampling reads the saved file; the same weights as built now
    run = load_run(run_dir, ema_length=0.08)
    for k, v in run.net.state_dict().items():
        assert torch.equal(v, built[k].to(v.dtype)), k
    r = _cli("sample", "--run", str(run_dir), "--ema-length", "0.07", "--n", "2", "--steps", "2",
             "--out", str(tmp_path / "g.png"))  # not saved: built on the fly
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "g.png").exists() and not (run_dir / "ema" / "ema-0.070.safetensors").exists()


@pytest.mark.parametrize("length", ["0", "-0.1", "0.3004", "0.9", "nan", "inf"])
def test_cli_ema_refuses_bad_lengths(tmp_path, length):
    r = _cli("ema", "--run", str(tmp_path), "--ema-length", length)
    assert r.returncode == 2 and "--ema-length" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_old_run_folders_keep_the_classic_ema(tmp_path):
    Trainer(cfg(tmp_path, steps=4, checkpoint_every=4, ema_length=0.0, ema_track="", ema_snapshot_every=0,
                noise_sampling="uniform"), **quiet).run()  # (uniform: the training levels before the field existed)
    path = tmp_path / "run" / "config.json"
    old = json.loads(path.read_text())
    for name in ("ema_length", "ema_track", "ema_snapshot_every", "noise_sampling", "loss_weighting", "min_snr_gamma"):
        del old[name]  # a config.json written before these fields existed
    path.write_text(json.dumps(old))
    c = load_run_config(tmp_path / "run")
    assert (c.ema_length, c.ema_track, c.ema_snapshot_every, c.autoguidance) == (0.0, "", 0, 3.0)
    del old["autoguidance"]
    path.write_text(json.dumps(old))
    c = load_run_config(tmp_path / "run")
    assert (c.ema_length, c.ema_track, c.ema_snapshot_every, c.autoguidance) == (0.0, "", 0, 1.0)
    assert (c.noise_sampling, c.loss_weighting) == ("uniform", "none")
    assert load_run(tmp_path / "run").sample(2, steps=2).shape == (2, 1, 8, 8)
    resumed = cfg(tmp_path, steps=6, checkpoint_every=4, noise_sampling="uniform")
    tr = Trainer(resumed, resume=True, given={"steps"}, **quiet)
    assert not isinstance(tr.ema, PowerEMA) and tr.tracked == [] and tr.step == 4
    tr.run()
    assert not (Path(tmp_path) / "run" / "ema-snapshots").exists()


# --- the early EMA as the autoguidance guide (Karras et al. 2024) ------------------------------------------
def test_guide_snapshot_is_the_one_nearest_the_fraction_in_the_first_half(tmp_path):
    folder = tmp_path / "ema-snapshots"
    folder.mkdir()
    assert guide_snapshot(tmp_path, 0.25) is None
    for step in (200, 400, 600, 800, 1000, 1200, 3000, 3076):
        (folder / f"step-{step:07d}.json").write_text("{}")
    assert guide_snapshot(tmp_path, 0.25).name == "step-0000800.json"  # 0.25 * 3076 = 769
    assert guide_snapshot(tmp_path, 0.5).name == "step-0001200.json"  # nothing between 1200 and 1538
    assert guide_snapshot(tmp_path, 0.01).name == "step-0000200.json"
    # an older checkpoint of the run (step 1000) is guided by a snapshot before it, not by a later one
    assert guide_snapshot(tmp_path, 0.25, step=1000).name == "step-0000200.json"
    assert guide_snapshot(tmp_path, 0.25, step=300) is None
    for p in folder.iterdir():
        if p.name != "step-0003076.json":
            p.unlink()
    assert guide_snapshot(tmp_path, 0.25) is None  # only the end of the run: no weaker version of it


def test_autoguidance_zero_samples_the_guide_and_one_the_run(trained):
    run = load_run(trained)
    assert run.autoguidable and run.sampling_defaults()["autoguidance"] == 3.0  # TrainConfig's default
    weights, info = load_guide(trained, 0.25, 0.1)
    assert info == {"step": 4, "ema_length": 0.1}  # 0.25 * 12 = 3: the snapshot of step 4, the main length
    guide = run.guide_net(3.0)
    assert all(torch.equal(v, weights[k]) for k, v in guide.state_dict().items())
    assert run.guide_net(1.0) is None and run.guide_net(None) is None
    plain = run.sample(4, steps=3, autoguidance=1.0)
    guided = run.sample(4, steps=3)  # the run's default, 3
    assert not torch.equal(plain, guided)
    only_guide = load_run(trained)
    only_guide.net.load_state_dict(weights)
    # D_guide + 0 (D - D_guide) is the guide alone (guiding at every level, plain: APG's eta 1, the mean not kept)
    assert torch.equal(run.sample(4, steps=3, autoguidance=0.0, guide_sigmas=(0, math.inf), apg_eta=1.0,
                                  guide_keep_mean=False),
                       only_guide.sample(4, steps=3, autoguidance=1.0))


def test_cli_autoguidance_is_checked(trained, tmp_path):
    r = _cli("sample", "--run", str(trained), "--autoguidance", "2", "--n", "2", "--steps", "2",
             "--out", str(tmp_path / "g.png"))
    assert r.returncode == 0, r.stderr
    r = _cli("sample", "--run", str(trained), "--autoguidance", "-1", "--n", "2", "--out", str(tmp_path / "h.png"))
    assert r.returncode == 2 and "--autoguidance" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "h.png").exists()


def test_runs_without_early_snapshots_sample_unguided(tmp_path):
    Trainer(cfg(tmp_path, steps=4, checkpoint_every=4, ema_snapshot_every=0), **quiet).run()
    run = load_run(tmp_path / "run")
    assert not run.autoguidable and "autoguidance" not in run.sampling_defaults()
    assert run.sample(2, steps=2).shape == (2, 1, 8, 8)
    r = _cli("sample", "--run", str(tmp_path / "run"), "--autoguidance", "2", "--n", "2",
             "--out", str(tmp_path / "g.png"))
    assert r.returncode == 2 and "early in training" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_runs_sample_down_to_their_sigma_min_and_guide_in_their_interval(trained):
    from difflab.runs import grid_bottom
    from difflab.runs.draw import request_evaluations
    from difflab.runs.request import SampleRequest

    run = load_run(trained)
    d = run.sampling_defaults()
    bottom = grid_bottom.load(trained)["sigma_min"]  # TrainConfig's default 'auto': measured when training ended
    # TrainConfig's defaults: every level above the grid's bottom up to 20, the update keeping each image's mean
    assert d["sigma_min"] == bottom > 0 and d["guide_sigmas"] == (recipe.above_grid_bottom(bottom), 20.0)
    assert d["guide_keep_mean"] is True
    req = SampleRequest(n=2).resolve(run.traits())
    assert req.guide_sigmas == (pytest.approx(bottom, rel=1e-5), 20.0) and req.guide_sigmas[0] > bottom
    levels = run.levels(req)
    assert len(levels) == req.steps and min(levels) == pytest.approx(bottom) and max(levels) == pytest.approx(80.0)
    inside = sum(req.guide_sigmas[0] <= s <= 20.0 for s in levels)  # all but the last (and those above 20)
    assert inside == sum(s <= 20.0 for s in levels) - 1 > 0
    assert request_evaluations(run, SampleRequest(n=2)) == req.steps + inside
    # the same samples as an explicit request with those settings; other settings change them
    default = run.sample(2, steps=4)
    explicit = dict(sigma_min=bottom, guide_sigmas=(bottom * (1 + 1e-6), 20.0), autoguidance=3.0, apg_eta=0.0,
                    guide_keep_mean=True)
    assert torch.equal(default, run.sample(2, steps=4, **explicit))
    assert not torch.equal(default, run.sample(2, steps=4, sigma_min=0.0))
    assert not torch.equal(default, run.sample(2, steps=4, guide_sigmas=(0.0, math.inf)))
    assert not torch.equal(default, run.sample(2, steps=4, guide_keep_mean=False))


def test_runs_from_before_the_interval_guide_everywhere_down_to_the_process(tmp_path):
    Trainer(cfg(tmp_path, steps=4, checkpoint_every=4), **quiet).run()
    path = tmp_path / "run" / "config.json"
    old = json.loads(path.read_text())
    for k in ("guide_sigma_min", "guide_sigma_max", "sample_sigma_min"):
        del old[k]
    path.write_text(json.dumps(old))
    c = load_run_config(tmp_path / "run")
    assert (c.guide_sigma_min, c.guide_sigma_max, c.sample_sigma_min) == (0.0, 1e9, 0.0)


def test_cli_sigma_settings_are_checked(trained, tmp_path):
    r = _cli("sample", "--run", str(trained), "--n", "2", "--steps", "3", "--sigma-min", "0.2",
             "--guide-sigmas", "0", "inf", "--out", str(tmp_path / "a.png"))
    assert r.returncode == 0, r.stderr
    for args, msg in ((("--sigma-min", "-1"), "--sigma-min"), (("--sigma-min", "100"), "--sigma-min"),
                      (("--guide-sigmas", "5", "1"), "--guide-sigmas")):
        r = _cli("sample", "--run", str(trained), "--n", "2", *args, "--out", str(tmp_path / "b.png"))
        assert r.returncode == 2 and msg in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert not (tmp_path / "b.png").exists()
