"""x0 clipping and dynamic thresholding in the denoiser interface, and the default recipe's resolution."""

from __future__ import annotations

import pytest
import torch

from difflab import recipe
from difflab.analytic import GaussianDataNet
from difflab.config import TrainConfig
from difflab.denoiser import ClipX0, Denoiser
from difflab.errors import UsageError
from difflab.processes.gaussian import cosine_schedule
from difflab.samplers import generate


class Fixed(torch.nn.Module):
    """A stand-in denoiser that returns a fixed x0 estimate."""

    def __init__(self, x0: torch.Tensor):
        super().__init__()
        self.x0, self.process = x0, cosine_schedule()

    def forward(self, x, sigma, cond=None):
        return self.x0.expand_as(x)


def test_clip_clamps_to_the_data_range():
    x0 = torch.tensor([[-3.0, -1.0, 0.2, 1.0, 7.0]])
    out = ClipX0(Fixed(x0), "clip")(torch.zeros(1, 5), torch.ones(1))
    assert torch.equal(out, torch.tensor([[-1.0, -1.0, 0.2, 1.0, 1.0]]))
    # another range: [0, 1] (data scaled to [0, 1])
    out = ClipX0(Fixed(x0), "clip", (0.0, 1.0))(torch.zeros(1, 5), torch.ones(1))
    assert torch.allclose(out, torch.tensor([[0.0, 0.0, 0.2, 1.0, 1.0]]))
    assert torch.equal(ClipX0(Fixed(x0), "none")(torch.zeros(1, 5), torch.ones(1)), x0)


def test_dynamic_thresholding_is_per_sample_and_leaves_in_range_samples_alone():
    inside = torch.linspace(-0.9, 0.9, 200)
    outside = torch.linspace(-4.0, 4.0, 200)  # the 99.5% quantile of |x| is about 3.98
    x0 = torch.stack([inside, outside])
    out = ClipX0(Fixed(x0), "dynamic", percentile=0.995)(torch.zeros(2, 200), torch.ones(2))
    assert torch.allclose(out[0], inside)  # s = max(1, q) = 1: only a clamp, which changes nothing
    s = torch.quantile(outside.abs(), 0.995)
    assert torch.allclose(out[1], outside.clamp(-s, s) / s)  # pulled back, not cut off: still ordered
    assert float(out[1].abs().max()) == pytest.approx(1.0) and bool((out[1].diff() >= 0).all())


def test_clipping_bad_settings_are_usage_errors():
    with pytest.raises(UsageError, match="unknown x0 clipping"):
        ClipX0(Fixed(torch.zeros(1)), "tanh")
    with pytest.raises(UsageError, match="lo < hi"):
        ClipX0(Fixed(torch.zeros(1)), "clip", (1.0, 1.0))
    with pytest.raises(UsageError, match="percentile"):
        ClipX0(Fixed(torch.zeros(1)), "dynamic", percentile=0.0)


def test_clipping_keeps_exact_samples_of_data_inside_the_range():
    """Gaussian data N(0.2, 0.1^2) lies inside [-1, 1]: with the exact denoiser, clipping changes the final
    samples by almost nothing, while a model that overshoots (x0 * 4, as an untrained net does) gives
    samples outside the pixel range without it and inside with it."""
    process = cosine_schedule()
    den = Denoiser(GaussianDataNet(process, mean=0.2, std=0.1), process, "eps")
    plain = generate(den, 64, (1, 4, 4), seed=1, sampler="ddim", steps=20, dtype=torch.float64)
    clipped = generate(ClipX0(den), 64, (1, 4, 4), seed=1, sampler="ddim", steps=20, dtype=torch.float64)
    assert float((plain - clipped).abs().max()) < 1e-2
    assert abs(float(clipped.mean()) - 0.2) < 0.02

    class Overshoot(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.process = process

        def forward(self, x, sigma, cond=None):
            return 4 * den(x, sigma, cond)

    wild = generate(Overshoot(), 64, (1, 4, 4), seed=1, sampler="ddim", steps=20)
    tamed = generate(ClipX0(Overshoot()), 64, (1, 4, 4), seed=1, sampler="ddim", steps=20)
    assert float(wild.abs().max()) > 1.5 and float(tamed.abs().max()) <= 1.0 + 1e-6


def test_native_bf16_reads_the_cpu_flags(monkeypatch):
    cpu = torch.device("cpu")
    for flags, expected in ((frozenset({"avx512f"}), False), (frozenset({"avx512f", "avx512_bf16"}), True),
                            (frozenset({"amx_bf16", "amx_tile"}), True), (frozenset(), False)):
        monkeypatch.setattr(recipe, "_cpu_flags", lambda f=flags: f)
        assert recipe.native_bf16(cpu) is expected


def test_resolve_fills_auto_lr_by_network_size_and_auto_precision(monkeypatch):
    monkeypatch.setattr(recipe, "_cpu_flags", lambda: frozenset({"avx512_bf16"}))
    cfg = recipe.resolve(TrainConfig(lr=0.0, precision="auto"), torch.device("cpu"), 717_000)
    assert (cfg.lr, cfg.precision) == (recipe.LR_SMALL, "bf16")
    monkeypatch.setattr(recipe, "_cpu_flags", lambda: frozenset())
    cfg = recipe.resolve(TrainConfig(lr=0.0, precision="auto"), torch.device("cpu"), 35_000_000)
    assert (cfg.lr, cfg.precision) == (recipe.LR_LARGE, "fp32")
    given = recipe.resolve(TrainConfig(lr=5e-4, precision="bf16"), torch.device("cpu"), 35_000_000)
    assert (given.lr, given.precision) == (5e-4, "bf16")  # what the user gave stays
    line = recipe.describe(cfg)
    assert "predict" in line and "sampling" in line and f"lr {recipe.LR_LARGE:g}" in line


def test_lr_zero_is_auto_and_negative_lr_is_refused():
    TrainConfig(lr=0.0).validate()
    with pytest.raises(UsageError, match="--lr"):
        TrainConfig(lr=-1e-3).validate()


def test_apg_default_follows_the_kind_and_old_runs_keep_plain_guidance():
    from difflab.methods.method import make_method

    def defaults(**kw):
        return make_method(TrainConfig(data="digits", out="/tmp/unused", **kw)).sampling_defaults()

    assert defaults()["apg_eta"] == 0.0  # autoguidance: projected (measured on MNIST and textures)
    assert "apg_eta" not in defaults(conditioning="class")  # classifier-free guidance: plain until measured
    assert defaults(conditioning="class", apg_eta=0.5)["apg_eta"] == 0.5
    assert "apg_eta" not in defaults(apg_eta=1.0)  # 1: plain guidance, no APG at all
    legacy = TrainConfig.from_json({"data": "digits", "out": "/tmp/unused"})
    assert legacy.apg_eta == 1.0 and recipe.guide_apg(legacy) is None  # runs saved before the field: unchanged
    for bad in (-0.5, 1.5, float("nan")):
        with pytest.raises(UsageError, match="--apg-eta"):
            TrainConfig(data="digits", out="/tmp/unused", apg_eta=bad)


def test_mean_free_guidance_is_on_for_autoguidance_and_off_for_old_runs():
    from difflab.methods.method import make_method

    def defaults(**kw):
        return make_method(TrainConfig(data="digits", out="/tmp/unused", **kw)).sampling_defaults()

    assert defaults()["guide_keep_mean"] is True  # autoguidance: measured on textures and MNIST
    assert "guide_keep_mean" not in defaults(conditioning="class")  # classifier-free: plain until measured
    assert defaults(conditioning="class", guide_keep_mean=1)["guide_keep_mean"] is True
    assert "guide_keep_mean" not in defaults(guide_keep_mean=0)
    assert "keeping each image's mean" in recipe.describe(TrainConfig(data="digits", out="/tmp/unused"))
    legacy = TrainConfig.from_json({"data": "digits", "out": "/tmp/unused"})
    assert legacy.guide_keep_mean == 0 and not recipe.guide_keep_mean(legacy)  # runs saved before the field
    for bad in (2, -2, 0.5):
        with pytest.raises(UsageError, match="--guide-keep-mean"):
            TrainConfig(data="digits", out="/tmp/unused", guide_keep_mean=bad)
