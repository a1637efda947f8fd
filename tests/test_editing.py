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
from difflab.processes.continuous import VPCosine
from difflab.samplers import generate, sampler_sigmas

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest

SHAPE = (1, 4, 4)
MU, S0 = 0.3, 0.5  # every pixel independent, N(MU, S0^2)


def exact():
    proc = VPCosine()
    return Denoiser(GaussianDataNet(proc, MU, S0), proc, "eps")


def images(n, seed=0, dtype=torch.float64):
    return (MU + S0 * torch.randn(n, *SHAPE, generator=torch.Generator().manual_seed(seed))).to(dtype)


def test_strength_picks_the_last_steps_of_the_grid():
    assert [start_index(10, s) for s in (0.0, 0.25, 0.5, 1.0)] == [10, 8, 5, 0]
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(UsageError, match="--strength must be in"):
            start_index(10, bad)


@pytest.mark.parametrize("strength", [0.3, 0.6])
def test_sdedit_through_the_ode_is_the_exact_ode_map_from_the_noised_image(strength):
    den, n = exact(), 64
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


@pytest.mark.parametrize("jump_length,resample", [(1, 1), (5, 3)])
def test_repaint_draws_the_masked_pixels_from_the_data_law(jump_length, resample):
    """Independent Gaussian pixels: the repainted ones are N(MU, S0^2), uncorrelated with each other and
    independent of the kept ones (set here far from the data, +-2); the kept ones are the originals exactly."""
    den, n = exact(), 2000
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
