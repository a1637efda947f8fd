"""Post-hoc EMA against an independent solution, and ``difflab ema`` / ``sample --ema-length`` on damaged
snapshots: every bad snapshot JSON or length is exit 2 with one line naming the file, and no file changes."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_reliability import TINY, assert_refused, cli

from difflab.ema_lengths import SIGMA_REL_MIN, gamma_of_sigma_rel, sigma_rel_of_gamma
from difflab.errors import UsageError
from difflab.runs.ema import PowerEMA, posthoc_coefficients, profile_inner
from difflab.runs.posthoc_ema import reconstruct_ema


def _profiles(steps: int, every: int, lengths=(0.05, 0.1)) -> tuple[np.ndarray, np.ndarray]:
    times = sorted({*range(every, steps + 1, every), steps})
    return (np.repeat(times, len(lengths)).astype(float),
            np.array([gamma_of_sigma_rel(a) for a in lengths] * len(times)))


def _lagrange(t, g, t_target, g_target) -> np.ndarray:
    """min ||sum x_k p_k - p_target||^2 subject to sum x_k = 1, by its KKT system [[A, 1], [1', 0]]."""
    A = profile_inner(t[:, None], g[:, None], t[None, :], g[None, :])
    b = profile_inner(t, g, t_target, g_target)
    n = len(t)
    kkt = np.block([[2 * A, np.ones((n, 1))], [np.ones((1, n)), np.zeros((1, 1))]])
    return np.linalg.solve(kkt, np.concatenate([2 * b, [1.0]]))[:n]


@pytest.mark.parametrize("steps,every", [(873, 200), (1000, 50), (10**6, 25_000)])
@pytest.mark.parametrize("length", [0.03, 0.08, 0.15, 0.25])
def test_coefficients_are_the_constrained_least_squares_solution(steps, every, length):
    t, g = _profiles(steps, every)
    x, err = posthoc_coefficients(t, g, steps, gamma_of_sigma_rel(length))
    assert x.sum() == pytest.approx(1, abs=1e-12)
    np.testing.assert_allclose(x, _lagrange(t, g, steps, gamma_of_sigma_rel(length)), atol=1e-9, rtol=1e-9)
    assert 0 <= err < 1


def _random_walk(steps=873, every=200, dims=4000):
    """Snapshots of two tracked power EMAs of a Gaussian random walk, and the true EMAs of other lengths."""
    torch.manual_seed(0)
    w = torch.zeros(dims, dtype=torch.float64)
    net = torch.nn.Linear(dims, 1, bias=False).double()
    tracked, true = [PowerEMA(net, a) for a in (0.05, 0.1)], {a: PowerEMA(net, a) for a in (0.08, 0.15)}
    snaps = []
    for step in range(1, steps + 1):
        w += torch.randn(dims, dtype=torch.float64)
        with torch.no_grad():
            net.weight.copy_(w[None])
        for e in [*tracked, *true.values()]:
            e.update(net)
        if step % every == 0 or step == steps:
            snaps += [e.model.weight.detach().flatten().clone() for e in tracked]
    return snaps, {a: e.model.weight.detach().flatten() for a, e in true.items()}


def test_random_walk_reconstruction_is_closer_than_the_plain_solve():
    """The issue's case: 873 steps, snapshots every 200. The plain solve's coefficients sum to 1.0039 at 0.08
    and 0.975 at 0.15; under the constraint the reconstruction is more than twice as close to the true EMA."""
    snaps, true = _random_walk()
    t, g = _profiles(873, 200)
    A = profile_inner(t[:, None], g[:, None], t[None, :], g[None, :])
    for length, plain_sum in ((0.08, 1.0039), (0.15, 0.9752)):
        gt = gamma_of_sigma_rel(length)
        plain = np.linalg.lstsq(A, profile_inner(t, g, 873, gt), rcond=None)[0]
        assert plain.sum() == pytest.approx(plain_sum, abs=1e-4)
        x, _ = posthoc_coefficients(t, g, 873, gt)
        errs = [float((sum(float(c) * s for c, s in zip(coef, snaps)) - true[length]).norm() / true[length].norm())
                for coef in (plain, x)]
        assert errs[1] < errs[0] / 2, errs


def test_weights_held_constant_come_back_exactly(tmp_path):
    from difflab.runs.posthoc_ema import save_snapshot

    net = torch.nn.Linear(3, 2)
    with torch.no_grad():
        net.weight.fill_(1.0)
        net.bias.fill_(-2.5)
    tracked = [PowerEMA(net, 0.05), PowerEMA(net, 0.1)]
    for step in range(1, 874):
        for e in tracked:
            e.update(net)
        if step % 200 == 0 or step == 873:
            save_snapshot(tmp_path, step, tracked)
    for length in (0.03, 0.08, 0.15):
        weights, _ = reconstruct_ema(tmp_path, length)
        assert weights["weight"].eq(1.0).all() and weights["bias"].eq(-2.5).all()  # (1.0039 before)


def test_lengths_are_bounded_to_what_the_maths_represents():
    assert sigma_rel_of_gamma(gamma_of_sigma_rel(SIGMA_REL_MIN)) == pytest.approx(SIGMA_REL_MIN, rel=1e-9)
    for bad in (1e-200, 5e-324, SIGMA_REL_MIN / 2, "0.1", None, True, [0.1]):
        with pytest.raises(UsageError, match="--ema-length"):
            gamma_of_sigma_rel(bad)


# --- the command line on damaged snapshots ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def snap_run(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("snaps")
    rc, err = cli("train", *TINY, "--steps", "3", "--ema-snapshot-every", "1", "--out", root / "run")
    assert rc == 0, err
    return root / "run"


@pytest.fixture
def snap_copy(snap_run, tmp_path):
    shutil.copytree(snap_run, tmp_path / "run")
    return tmp_path / "run"


def _newest(run: Path) -> Path:
    return run / "ema-snapshots" / "step-0000003.json"


def _edit(path: Path, drop: str | None = None, **changes) -> None:
    d = json.loads(path.read_text())
    d.update(changes)
    d.pop(drop, None)
    path.write_text(json.dumps(d))


DAMAGE = {
    "not-object": lambda p: p.write_text("[1]"),
    "binary": lambda p: p.write_bytes(b"\xff\xfe\x00\x01"),
    "no-updates": lambda p: _edit(p, drop="updates"),
    "string-updates": lambda p: _edit(p, updates=["a", "b"]),
    "nan-length": lambda p: _edit(p, ema_lengths=[math.nan, 0.1]),
    "negative-updates": lambda p: _edit(p, updates=[-3, 3]),
    "empty-updates": lambda p: _edit(p, updates=[], gammas=[], ema_lengths=[]),
    "three-emas": lambda p: _edit(p, ema_lengths=[0.05, 0.1, 0.08], updates=[3, 3, 3],
                                  gammas=[gamma_of_sigma_rel(a) for a in (0.05, 0.1, 0.08)]),
    "one-ema": lambda p: _edit(p, ema_lengths=[0.05], updates=[3], gammas=[gamma_of_sigma_rel(0.05)]),
    "wrong-gammas": lambda p: _edit(p, gammas=[1.0, 2.0]),
    "tiny-length": lambda p: _edit(p, ema_lengths=[1e-200, 0.1]),
    "string-step": lambda p: _edit(p, step="x"),
    "other-step": lambda p: _edit(p, step=99),
    "bool-updates": lambda p: _edit(p, updates=[True, True]),
    "huge-updates": lambda p: _edit(p, updates=[10**400, 3]),
    "fifo": lambda p: (p.unlink(), os.mkfifo(p)),
}


@pytest.mark.parametrize("how", DAMAGE)
def test_damaged_snapshot_is_one_line_naming_it(snap_copy, tmp_path, how):
    DAMAGE[how](_newest(snap_copy))
    line = assert_refused(snap_copy, "ema", "--run", snap_copy, "--ema-length", "0.08")
    assert "step-0000003.json" in line
    assert not (snap_copy / "ema").exists()
    line = assert_refused(snap_copy, "sample", "--run", snap_copy, "--ema-length", "0.07", "--n", "1", "--steps", "1",
                          "--out", tmp_path / "g.png")
    assert "step-0000003.json" in line and not (tmp_path / "g.png").exists()


@pytest.mark.parametrize("length", ["1e-200", "5e-324", "1e-7", "-0"])
def test_tiny_lengths_are_one_line(snap_run, tmp_path, length):
    assert_refused(snap_run, "ema", "--run", snap_run, "--ema-length", length, match="--ema-length")
    assert_refused(snap_run, "sample", "--run", snap_run, "--ema-length", length, "--n", "1",
                   "--out", tmp_path / "g.png", match="--ema-length")


_JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_subnormal=False) | st.text(max_size=5),
                     lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
                     max_leaves=8)


@given(st.sampled_from(["ema_lengths", "gammas", "updates", "step", "kind", "tensors", "sha256"]), _JSON)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_fuzz_snapshot_fields(snap_run, tmp_path_factory, key, value):
    run = tmp_path_factory.mktemp("fuzz") / "run"
    shutil.copytree(snap_run, run)
    js = _newest(run)
    d = json.loads(js.read_text())
    if d.get(key) == value:
        return
    d[key] = value
    js.write_text(json.dumps(d))
    assert_refused(run, "ema", "--run", run, "--ema-length", "0.08", match="step-0000003.json")
    assert not (run / "ema").exists()
