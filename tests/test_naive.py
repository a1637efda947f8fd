"""Part 1: binomial noise, pixel noise, degradations and the naive / cold diffusion algorithms."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from difflab.errors import UsageError
from difflab.naive import (
    TIME_SCALE,
    cold_loss,
    cold_prior,
    cold_sample,
    naive1_loss,
    naive1_pair,
    naive1_position,
    naive1_sample,
    naive2_loss,
    naive2_sample,
)
from difflab.processes import (
    DEGRADATIONS,
    BinomialNoise,
    FadeToBlack,
    FadeToColour,
    PixelNoise,
    get_degradation,
    random_bits,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def images(b: int = 4, c: int = 3, h: int = 16, w: int = 16, seed: int = 0) -> torch.Tensor:
    """Images in (-0.9, 0.9) with structure at several scales, so no pixel looks like noise (+-1)."""
    g = gen(seed)
    coarse = F.interpolate(torch.rand(b, c, 4, 4, generator=g), size=(h, w), mode="bilinear")
    fine = torch.rand(b, c, h, w, generator=g)
    return 0.9 * (coarse + 0.5 * fine - 0.75).clamp(-1, 1)


class Recorder(torch.nn.Module):
    """A tiny fixed net (1x1 conv + time) that records the times it was called with."""

    def __init__(self, channels: int = 3) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(channels, channels, 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.eye(channels).view(channels, channels, 1, 1) * 0.7)
            self.conv.bias.fill_(0.1)
        self.times: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.times.append(t.detach().clone())
        return torch.tanh(self.conv(x) + (t / TIME_SCALE - 0.5).view(-1, 1, 1, 1))


def touched(z: torch.Tensor) -> torch.Tensor:
    """Pixels set by noise when the chain starts from zeros: [B, H, W] bool."""
    return z[:, 0] != 0


# Binomial noise (algorithm 1)


def test_untouched_fraction_series_setting():
    noise = BinomialNoise(32, 60)
    f = noise.untouched_fraction(32, 32)
    assert f == pytest.approx((31 / 32) ** 60, rel=1e-12)
    assert 0.14 < f < 0.16
    assert noise.summary(32, 32) == (
        "binomial noise k=32, T=60 on 32x32: 14.9% of pixels never touched (with replacement)"
    )
    assert BinomialNoise(8, 60, replace=False).untouched_fraction(32, 32) == pytest.approx(1 - 480 / 1024)
    assert "0.0% of pixels never touched (without" in BinomialNoise(16, 64, replace=False).summary(32, 32)


def test_untouched_fraction_matches_simulation_with_replacement():
    noise = BinomialNoise(32, 60)
    z_T = noise.chain(torch.zeros(96, 1, 32, 32), gen(1))[-1]
    simulated = 1 - touched(z_T).float().mean().item()
    assert simulated == pytest.approx(noise.untouched_fraction(32, 32), abs=0.008)


def test_without_replacement_walks_new_pixels():
    noise = BinomialNoise(8, 60, replace=False)
    chain = noise.chain(torch.zeros(16, 1, 32, 32), gen(2))
    counts = touched(chain.flatten(0, 1)).view(61, 16, -1).sum(-1)
    expected = (torch.arange(61) * 8)[:, None].expand(61, 16)
    assert torch.equal(counts, expected)
    assert 1 - counts[-1].float() / 1024 == pytest.approx(torch.full((16,), noise.untouched_fraction(32, 32)))


def test_without_replacement_too_many_steps_is_a_clear_error():
    noise = BinomialNoise(32, 60, replace=False)
    with pytest.raises(ValueError, match=r"T\*k = 60\*32 = 1920 > 32x32 = 1024"):
        noise.untouched_fraction(32, 32)
    with pytest.raises(UsageError):
        noise.chain(torch.zeros(1, 1, 32, 32), gen())
    with pytest.raises(ValueError):
        BinomialNoise(2000, 1).step(torch.zeros(1, 1, 32, 32), 1, gen())


def test_step_with_replacement_picks_k_distinct_pixels():
    z = BinomialNoise(32, 60).step(torch.zeros(10, 2, 32, 32), 1, gen(3))
    assert torch.equal(touched(z).flatten(1).sum(1), torch.full((10,), 32))


def test_bits_are_shared_by_channels():
    chain = BinomialNoise(16, 20).chain(torch.zeros(4, 3, 16, 16), gen(4))
    assert torch.equal(chain[:, :, 0], chain[:, :, 1]) and torch.equal(chain[:, :, 0], chain[:, :, 2])
    assert set(chain.unique().tolist()) == {-1.0, 0.0, 1.0}
    z = PixelNoise(16, 16).sample(torch.zeros(4, 3, 16, 16), torch.tensor([0, 10, 100, 256]), gen(5))
    assert torch.equal(z[:, 0], z[:, 1]) and torch.equal(z[:, 0], z[:, 2])
    bits = random_bits((64, 3, 16, 16), gen(6))
    assert torch.equal(bits[:, 0], bits[:, 2]) and set(bits.unique().tolist()) == {-1.0, 1.0}
    assert bits.mean().abs() < 0.02


# Pixel noise (algorithm 2)


def sequential_pixel_noise(n_images: int, h: int, w: int, t: int, generator: torch.Generator) -> torch.Tensor:
    """Reference: t single-pixel steps, each picking a pixel not noised before (an independent implementation)."""
    z = torch.zeros(n_images, h * w)
    for _ in range(t):
        pick = torch.multinomial((z == 0).float(), 1, generator=generator)
        bit = torch.randint(0, 2, (n_images, 1), generator=generator).float() * 2 - 1
        z.scatter_(1, pick, bit)
    return z


def chi_square(observed: torch.Tensor, expected: torch.Tensor) -> float:
    return float(((observed - expected) ** 2 / expected).sum())


def test_direct_draw_has_the_law_of_sequential_steps():
    n_images, h, w, t = 4000, 6, 6, 10
    direct = PixelNoise(h, w).sample(torch.zeros(n_images, 1, h, w), t, gen(7)).view(n_images, -1)
    sequential = sequential_pixel_noise(n_images, h, w, t, gen(8))
    binom = torch.distributions.Binomial(t, torch.tensor(0.5))
    pmf = binom.log_prob(torch.arange(t + 1).float()).exp()
    bins = [slice(0, 3), 3, 4, 5, 6, 7, slice(8, t + 1)]  # merge the thin tails
    expected = torch.stack([pmf[b].sum() for b in bins]) * n_images
    for z in (direct, sequential):
        assert torch.equal((z != 0).sum(1), torch.full((n_images,), t))  # exactly t pixels noised
        black = torch.bincount((z == -1).sum(1), minlength=t + 1).float()
        observed = torch.stack([black[b].sum() for b in bins])
        assert chi_square(observed, expected) < 22.5  # chi2(6 dof) at p = 0.001
        hits = (z != 0).sum(0).float()  # which pixels: uniform, each with probability t / (hw)
        assert chi_square(hits, torch.full_like(hits, n_images * t / (h * w))) < 66.6  # chi2(35) at p = 0.001
    means = [(z == -1).sum(1).float() for z in (direct, sequential)]
    assert means[0].mean() == pytest.approx(t / 2, abs=0.1) and means[1].mean() == pytest.approx(
        t / 2, abs=0.1
    )
    assert means[0].var() == pytest.approx(t / 4, rel=0.1) and means[1].var() == pytest.approx(t / 4, rel=0.1)


def test_pixel_noise_is_vectorised_and_nested():
    noise = PixelNoise(8, 8)
    t = torch.arange(0, 65, 4)
    z = noise.sample(torch.zeros(len(t), 1, 8, 8), t, gen(9))
    assert torch.equal(touched(z).flatten(1).sum(1), t)
    x = images(3, 3, 8, 8)
    state = noise.prepare(x, gen(10))
    assert torch.equal(noise.apply(x, 0, state), x)
    full = noise.apply(x, noise.T, state)
    assert torch.equal(full, state.bits.view(3, 1, 8, 8).expand(3, 3, 8, 8))
    z20, z40 = noise.apply(x, 20, state), noise.apply(x, 40, state)
    noised20 = z20 != x
    assert torch.equal(z40[noised20], z20[noised20])  # D is deterministic given the state, nested in t
    assert torch.equal(noise.apply(x, 40, state), z40)


# Algorithm 1


def test_naive1_position_walks_each_batch_for_T_steps():
    assert [naive1_position(n, 60) for n in (0, 59, 60, 61, 125)] == [(0, 1), (0, 60), (1, 1), (1, 2), (2, 6)]


@pytest.mark.parametrize("replace", [True, False])
def test_naive1_pair_is_one_step_apart(replace):
    x = images(4, 3, 16, 16)
    noise = BinomialNoise(8, 30, replace=replace)
    z_prev, z_t = naive1_pair(x, 1, noise, seed=0, batch_index=3)
    assert torch.equal(z_prev, x)
    for t in (1, 7, 30):
        z_prev, z_t = naive1_pair(x, t, noise, seed=0, batch_index=3)
        changed = (z_prev != z_t).any(1)  # [B, H, W]
        assert (changed.flatten(1).sum(1) <= 8).all()
        assert set(z_t.permute(0, 2, 3, 1)[changed].unique().tolist()) <= {-1.0, 1.0}
        assert torch.equal(z_t[:, 0][changed], z_t[:, 1][changed])
        assert ((z_t.abs() == 1).all(1).flatten(1).sum(1) <= t * 8).all()


def test_naive1_pair_is_a_pure_function_of_seed_batch_and_t():
    x = images(2, 1, 16, 16)
    noise = BinomialNoise(8, 20)
    pairs = [naive1_pair(x, t, noise, seed=5, batch_index=2) for t in range(1, 21)]
    for t in (1, 13, 20):  # resuming at any step gives the same pair
        again = naive1_pair(x, t, noise, seed=5, batch_index=2)
        assert torch.equal(again[0], pairs[t - 1][0]) and torch.equal(again[1], pairs[t - 1][1])
    for (_, z_t), (z_next_prev, _) in itertools.pairwise(pairs):
        assert torch.equal(z_t, z_next_prev)  # one chain
    assert not torch.equal(naive1_pair(x, 20, noise, 5, 3)[1], pairs[-1][1])
    assert not torch.equal(naive1_pair(x, 20, noise, 6, 2)[1], pairs[-1][1])
    with pytest.raises(ValueError):
        naive1_pair(x, 21, noise, 5, 2)


def test_naive1_loss_predicts_the_previous_step():
    x = images(2, 3, 8, 8)
    z_prev, z_t = naive1_pair(x, 4, BinomialNoise(4, 10), seed=0, batch_index=0)
    times = []
    loss = naive1_loss(lambda z, t: times.append(t) or z, z_prev, z_t, 4, 10)
    assert loss.item() == pytest.approx(F.mse_loss(z_t, z_prev).item())
    assert torch.equal(times[0], torch.full((2,), 400.0))
    net = Recorder()
    naive1_loss(net, z_prev, z_t, 4, 10).backward()
    assert net.conv.weight.grad is not None and net.conv.weight.grad.abs().sum() > 0


def test_naive1_sample_runs_the_chain_backwards():
    net, steps = Recorder(), []
    out = naive1_sample(net, (3, 3, 8, 8), 5, gen(11), callback=steps.append)
    assert [float(t[0]) for t in net.times] == [1000.0, 800.0, 600.0, 400.0, 200.0]
    assert [s["t"] for s in steps] == [4, 3, 2, 1, 0]
    assert out.shape == (3, 3, 8, 8) and out.abs().max() <= 1
    assert torch.equal(out, naive1_sample(Recorder(), (3, 3, 8, 8), 5, gen(11)))
    first = []
    naive1_sample(lambda z, t: first.append(z) or z, (2, 3, 8, 8), 1, gen(12))
    assert torch.equal(first[0], random_bits((2, 3, 8, 8), gen(12)))


# Algorithm 2


def test_naive2_loss_trains_to_predict_the_clean_image():
    net = Recorder()
    loss = naive2_loss(net, images(8, 3, 8, 8), gen(13))
    loss.backward()
    assert torch.isfinite(loss) and net.conv.weight.grad.abs().sum() > 0
    t = net.times[0]
    assert (t > 0).all() and (t <= 1000).all() and len(t.unique()) > 1
    assert naive2_loss(net, images(8, 3, 8, 8), gen(13)).item() == pytest.approx(loss.item())


@pytest.mark.parametrize("steps", [4, 5, 64])
def test_naive2_sample_denoises_then_renoises(steps):
    net, trace = Recorder(), []
    out = naive2_sample(net, (2, 3, 8, 8), steps, gen(14), callback=trace.append)
    ts = [64 * (steps - i) // steps for i in range(steps + 1)]
    assert [float(t[0]) for t in net.times] == pytest.approx([1000 * t / 64 for t in ts[:-1]])
    assert [s["t"] for s in trace] == ts[1:]
    assert torch.equal(out, trace[-1]["x0"]) and torch.equal(trace[-1]["x"], out)  # z_0 = x_hat
    for s in trace:  # the renoised z has exactly t noised pixels
        assert ((s["x"] != s["x0"]).any(1).flatten(1).sum(1) <= s["t"]).all()
    assert torch.equal(out, naive2_sample(Recorder(), (2, 3, 8, 8), steps, gen(14)))


def test_naive2_cold_update_locks_in_revealed_pixels():
    calls = []

    def net(z, t):  # a different flat prediction at every step
        calls.append(z)
        return torch.full_like(z, 0.1 * len(calls) - 0.25)

    trace = []
    naive2_sample(net, (3, 1, 8, 8), 4, gen(15), cold_update=True, callback=trace.append)
    final = trace[-1]["x"]
    for i in range(4):  # 16 pixels revealed at step i keep the value predicted at step i
        assert torch.allclose(
            (final - (0.1 * (i + 1) - 0.25)).abs().lt(1e-6).flatten(1).sum(1).float(), torch.full((3,), 16.0)
        )
    assert set(calls[0].unique().tolist()) == {-1.0, 1.0}


def test_naive2_told_noise_tells_the_network_a_fraction_of_the_noise():
    net = Recorder()
    out = naive2_sample(net, (2, 3, 8, 8), 4, gen(24), told_noise=0.5)
    assert [float(t[0]) for t in net.times] == pytest.approx([500.0, 375.0, 250.0, 125.0])  # 0.5 * 1000 t / T
    assert not torch.equal(out, naive2_sample(Recorder(), (2, 3, 8, 8), 4, gen(24)))
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="told_noise"):
            naive2_sample(Recorder(), (2, 3, 8, 8), 4, gen(24), told_noise=bad)


# Degradations and cold diffusion


@pytest.mark.parametrize("name", list(DEGRADATIONS))
def test_degradation_goes_from_identity_to_fully_degraded(name):
    d = get_degradation(name)
    assert d.name == name
    x = images(4, 3, 16, 16)
    state = d.prepare(x, gen(16))
    assert torch.allclose(d.degrade(x, 0.0, state), x, atol=1e-6)
    full = d.degrade(x, 1.0, state)
    assert torch.equal(full, d.prior(x, state))
    flat = full.flatten(2)
    assert torch.allclose(flat, flat[..., :1].expand_as(flat), atol=1e-6)  # one colour per image
    colour = {
        "fade-black": torch.full((4, 3, 1, 1), -1.0),
        "blur": x.mean((2, 3), keepdim=True),
        "pixelate": x.mean((2, 3), keepdim=True),
    }.get(name, state)
    assert torch.allclose(full, colour.expand_as(full), atol=1e-5)
    levels = torch.linspace(0, 1, 41)
    dist = torch.stack([(d.degrade(x, float(t), state) - x).flatten(1).norm(dim=1) for t in levels])
    assert (dist[1:] - dist[:-1] >= -1e-5).all(), "distance to x must grow with the level"
    assert (dist[-1] > dist[0] + 0.1).all()
    t = torch.tensor([0.0, 0.3, 0.71, 1.0])  # one level per image = each image at its own level
    one_by_one = torch.cat(
        [d.degrade(x[i : i + 1], float(t[i]), None if state is None else state[i : i + 1]) for i in range(4)]
    )
    assert torch.allclose(d.degrade(x, t, state), one_by_one, atol=1e-6)


@pytest.mark.parametrize("name", list(DEGRADATIONS))
def test_only_fade_to_black_degrades_everything_to_one_image(name):
    d = get_degradation(name)
    x1, x2 = images(2, 3, 16, 16, seed=1), images(2, 3, 16, 16, seed=2)
    full1, full2 = d.degrade(x1, 1.0, d.prepare(x1, gen(1))), d.degrade(x2, 1.0, d.prepare(x2, gen(2)))
    assert torch.equal(full1, full2) == (name == "fade-black")


def test_fade_to_black_sampling_collapses_fade_to_colour_does_not():
    net = Recorder()
    ref = torch.zeros(2, 3, 8, 8)
    samples = {}
    for d in (FadeToBlack(), FadeToColour()):
        samples[d.name] = []
        for seed in range(4):
            x_T, state = cold_prior(d, ref, gen(seed))
            samples[d.name].append(cold_sample(net, x_T, d, 10, state))
    black, colour = samples["fade-black"], samples["fade-colour"]
    assert all(torch.equal(s, black[0]) for s in black)
    assert torch.equal(black[0][0], black[0][1])  # even within a batch
    assert all(not torch.allclose(colour[i], colour[j], atol=1e-3) for i in range(4) for j in range(i))


@pytest.mark.parametrize("name", list(DEGRADATIONS))
@pytest.mark.parametrize("improved", [True, False])
def test_cold_sampling_with_a_perfect_network_returns_the_image(name, improved):
    d = get_degradation(name)
    x = images(2, 3, 16, 16)
    x_T, state = cold_prior(d, x, gen(17))
    trace = []
    out = cold_sample(lambda z, t: x, x_T, d, 8, state, improved=improved, callback=trace.append)
    assert torch.allclose(out, x, atol=1e-5)
    assert [s["t"] for s in trace] == pytest.approx([(7 - i) / 8 for i in range(8)])
    for s in trace:  # with a perfect f every intermediate is D(x, t)
        assert torch.allclose(s["x"], d.degrade(x, s["t"], state), atol=1e-5)


def test_cold_loss():
    x = images(6, 3, 8, 8)
    d = FadeToColour()
    assert cold_loss(lambda z, t: x, x, d, gen(18)).item() == 0
    assert cold_loss(lambda z, t: torch.zeros_like(z), x, d, gen(18)).item() == pytest.approx(
        x.abs().mean().item()
    )
    assert cold_loss(lambda z, t: torch.zeros_like(z), x, d, gen(18), norm="l2").item() == pytest.approx(
        x.pow(2).mean().item()
    )
    net = Recorder()
    cold_loss(net, x, d, gen(19)).backward()
    assert net.conv.weight.grad.abs().sum() > 0
    assert (net.times[0] > 0).all() and (net.times[0] <= 1000).all()
    with pytest.raises(ValueError):
        cold_loss(net, x, d, gen(19), norm="l3")


def test_registry_and_errors():
    assert set(DEGRADATIONS) == {"fade-colour", "fade-black", "mask", "blur", "pixelate"}
    with pytest.raises(UsageError, match="choose one of"):
        get_degradation("sharpen")
    with pytest.raises(ValueError, match="prepare"):
        FadeToColour().degrade(images(1), 0.5)
