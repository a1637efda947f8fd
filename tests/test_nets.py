"""Networks: the call contract, config round trips, conditioning semantics, presets, the diffusers twin."""

from __future__ import annotations

import json
import os

import pytest
import torch

from difflab.errors import UsageError
from difflab.nets import (
    PRESETS,
    CoordConvUNet,
    UNet,
    build,
    count_parameters,
    diffusers_twin_kwargs,
    from_preset,
    match_layout,
    norm_act,
)
from difflab.nets.coordconv import CoordConv2d
from difflab.nets.layers import GroupNorm, attention
from difflab.nets.presets import SIZED

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _randomise(net: torch.nn.Module, seed: int = 0, scale: float = 0.1) -> torch.nn.Module:
    """Move every parameter off its (partly zero) initialisation, so that every path carries signal."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return net.eval()


def _tiny(**overrides) -> UNet:
    return _randomise(from_preset("tiny", **overrides))


def _differs(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool((a - b).abs().max() > 1e-3 * a.abs().max())


def _inputs(b=3, c=1, size=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, c, size, size, generator=g), torch.linspace(1.0, 999.0, b)


@pytest.mark.parametrize(
    "config",
    [
        dict(PRESETS["tiny"]),
        dict(PRESETS["tiny"], in_channels=3, out_channels=6, use_scale_shift_norm=True),
        dict(PRESETS["tiny"], channel_mult=[1, 2, 2], attention_resolutions=[16, 8], head_channels=4),
        dict(PRESETS["series-alg1"]),
        dict(PRESETS["series-alg2"], in_channels=3, channels=[8, 16], num_res_blocks=2),
    ],
)
@pytest.mark.parametrize("size", [32, 16, 8])
def test_output_shape(config, size):
    net = build(config)
    x, t = _inputs(2, config["in_channels"], size)
    out = net(x, t)
    assert out.shape == (2, net.config["out_channels"], size, size)
    assert out.dtype == x.dtype and torch.isfinite(out).all()


def test_output_starts_at_zero_and_scalar_time_is_accepted():
    net = from_preset("tiny")
    x, _ = _inputs()
    assert torch.equal(net(x, torch.tensor(5.0)), torch.zeros_like(x))  # zero-initialised output conv


def test_odd_sizes_are_rejected_clearly():
    with pytest.raises(ValueError, match="divisible"):
        from_preset("tiny")(torch.zeros(1, 1, 15, 15), torch.zeros(1))
    with pytest.raises(ValueError, match="divisible"):
        from_preset("series-alg1")(torch.zeros(1, 1, 30, 30), torch.zeros(1))


@pytest.mark.parametrize(
    "net",
    [
        lambda: _tiny(num_classes=10, context_dim=12, in_channels=3),
        lambda: _randomise(from_preset("series-alg1", time_scale=60.0)),
    ],
)
def test_build_round_trip(net):
    net = net()
    config = json.loads(json.dumps(net.config))
    assert config == net.config and config["kind"] in ("unet", "coordconv_unet")
    twin = build(config).eval()
    twin.load_state_dict(net.state_dict())
    x, t = _inputs(2, net.config["in_channels"])
    assert torch.equal(net(x, t), twin(x, t))


def test_presets_and_errors():
    with torch.device("meta"):  # the GPU presets hold up to 279M parameters: no memory, no initialisation
        for name, config in PRESETS.items():
            assert config.items() <= build(config).config.items(), name
    assert from_preset("tiny", in_channels=3).config["out_channels"] == 3
    with pytest.raises(UsageError, match="preset"):
        from_preset("no-such-net")
    with pytest.raises(UsageError, match="kind"):
        build({"kind": "no_such_kind"})
    with pytest.raises(UsageError, match="bogus"):
        build(dict(PRESETS["tiny"], bogus=1))
    assert count_parameters(from_preset("tiny")) < 20_000


@pytest.mark.parametrize("name", [name for name in SIZED if name.startswith("cpu") and not name.endswith("-wide")])
def test_sized_cpu_presets_train_at_their_size(name):
    size = PRESETS[name]["image_size"]
    net = from_preset(name)
    x = torch.randn(2, 3, size, size)
    net(x, torch.tensor([10.0, 900.0])).square().mean().backward()
    assert all(p.grad is not None for p in net.parameters())


def test_sized_presets_have_a_diffusers_twin():
    for name in SIZED:
        kwargs = diffusers_twin_kwargs(name)
        assert kwargs["sample_size"] == PRESETS[name]["image_size"], name
        assert len(kwargs["block_out_channels"]) == len(PRESETS[name]["channel_mult"]), name


def test_ddpm_cifar10_size():
    n = count_parameters(from_preset("ddpm-cifar10"))
    assert abs(n - 35.7e6) / 35.7e6 < 0.01
    assert n == 35_746_307  # diffusers UNet2DModel with the DDPM CIFAR-10 configuration


def test_class_conditioning():
    net = _tiny(num_classes=10)
    x, t = _inputs()
    a = net(x, t, torch.tensor([0, 1, 2]))
    b = net(x, t, torch.tensor([3, 1, 2]))
    assert _differs(a[0], b[0]) and torch.equal(a[1:], b[1:])
    null = net(x, t, torch.full((3,), 10))  # num_classes is the null label
    assert torch.equal(null, net(x, t)) and _differs(null, a)


def test_context_and_mask_semantics():
    net = _tiny(context_dim=12)
    x, t = _inputs()
    g = torch.Generator().manual_seed(2)
    ctx = torch.randn(3, 5, 12, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]], dtype=torch.bool)
    out = net(x, t, context=ctx, context_mask=mask)
    assert torch.isfinite(out).all()
    # masked tokens are ignored
    ctx2 = torch.where(mask[..., None], ctx, torch.randn(3, 5, 12, generator=g))
    assert torch.allclose(out, net(x, t, context=ctx2, context_mask=mask), atol=1e-6)
    # the context matters, and no mask means every token counts
    assert _differs(out[1], net(x, t, context=ctx * 2, context_mask=mask)[1])
    assert torch.allclose(out[1], net(x, t, context=ctx)[1], atol=1e-6)
    # a fully masked row is the null prompt, which is what context=None means
    null = net(x, t)
    assert torch.allclose(out[2], null[2], atol=1e-6)
    assert _differs(out[0], null[0])


def test_conditions_on_a_network_without_them_are_errors():
    x, t = _inputs()
    with pytest.raises(ValueError, match="class"):
        from_preset("tiny")(x, t, torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="context"):
        from_preset("tiny")(x, t, context=torch.zeros(3, 2, 4))
    with pytest.raises(ValueError, match="no conditions"):
        from_preset("series-alg1")(x, t, class_labels=torch.zeros(3, dtype=torch.long))


@pytest.mark.parametrize("kind", ["tiny", "series-alg1"])
def test_time_is_continuous_and_matters(kind):
    net = _randomise(from_preset(kind))
    x, _ = _inputs(1)
    t = torch.tensor([400.0])
    a, b, c = net(x, t), net(x, t + 1e-3), net(x, t + 100)
    assert (a - b).abs().max() < 1e-3 * a.abs().max()
    assert _differs(a, c)


def test_samples_do_not_interact():
    net = _tiny(num_classes=4, context_dim=6)
    x, t = _inputs(4)
    labels, ctx = torch.tensor([0, 1, 4, 2]), torch.randn(4, 3, 6)
    mask = torch.tensor([[1, 1, 0]] * 4, dtype=torch.bool)
    full = net(x, t, labels, ctx, mask)
    assert torch.allclose(full[:2], net(x[:2], t[:2], labels[:2], ctx[:2], mask[:2]), atol=1e-6)


def test_gradient_reaches_every_parameter():
    net = _tiny(num_classes=3, context_dim=6, use_scale_shift_norm=True).train()
    x, t = _inputs(4)
    ctx, mask = (
        torch.randn(4, 3, 6),
        torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0], [1, 1, 1]], dtype=torch.bool),
    )
    labels = torch.tensor([0, 1, 2, 3])  # every row of the class table, the null row included
    net(x, t, labels, ctx, mask).square().mean().backward()
    dead = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not dead

    coord = _randomise(from_preset("series-alg1")).train()
    coord(x, t).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in coord.parameters())


def test_training_from_the_zero_init_wakes_every_parameter():
    torch.manual_seed(0)
    net = from_preset("tiny", num_classes=2)
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    x, t = _inputs(4)
    labels = torch.tensor([0, 1, 2, 0])
    for _ in range(3):
        opt.zero_grad()
        (net(x, t, labels) - x).square().mean().backward()
        opt.step()
    assert all(p.grad.abs().sum() > 0 for p in net.parameters())


@pytest.mark.parametrize("kind", ["tiny", "series-alg2"])
def test_channels_last_gives_the_same_output(kind):
    overrides = {"in_channels": 3} if kind == "tiny" else {"in_channels": 3, "channels": [8, 16]}
    net = _randomise(from_preset(kind, **overrides))
    x, t = _inputs(2, 3)
    ref = net(x, t)
    net_cl = net.to(memory_format=torch.channels_last)
    out = net_cl(x.contiguous(memory_format=torch.channels_last), t)
    assert torch.allclose(ref, out, atol=1e-5)


def test_bf16_autocast_and_bf16_weights():
    net = _tiny(num_classes=3, context_dim=6)
    x, t = _inputs(2)
    ctx = torch.randn(2, 3, 6)
    ref = net(x, t, torch.tensor([0, 1]), ctx)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(x, t, torch.tensor([0, 1]), ctx)
    assert out.dtype == torch.float32
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()
    out16 = net.to(torch.bfloat16)(x.bfloat16(), t, torch.tensor([0, 1]), ctx)
    assert out16.dtype == torch.bfloat16 and torch.isfinite(out16).all()


def test_canonical_strides():
    x = torch.randn(2, 1, 4, 4)
    ambiguous = x.as_strided(x.shape, (16, 1, 4, 1))  # one channel: "contiguous" in both layouts
    for fmt, strides in ((torch.contiguous_format, (16, 16, 4, 1)), (torch.channels_last, (16, 1, 4, 1))):
        for given in (x, ambiguous):
            y = match_layout(given, fmt)
            assert y.stride() == strides and torch.equal(y, x)
    y = match_layout(torch.randn(2, 3, 4, 5), torch.channels_last)
    assert y.stride() == (60, 1, 15, 3)


def test_one_channel_input_follows_the_layout_of_the_weights():
    """The convolutions of a one-channel image must not switch layout because of its strides."""
    seen = []
    for fmt in (torch.contiguous_format, torch.channels_last):
        net = _tiny().to(memory_format=fmt)
        hook = net.stem.register_forward_pre_hook(lambda m, a: seen.append(a[0].stride()))
        x = torch.randn(2, 1, 32, 32)
        net(x.as_strided(x.shape, (1024, 1, 32, 1)), torch.tensor([3.0, 4.0]))
        hook.remove()
    assert seen == [(1024, 1024, 32, 1), (1024, 1, 32, 1)]


def test_group_norm_reference_stays_bf16_under_cpu_autocast(monkeypatch):
    """The plain-torch path (used where the fused CPU kernel is not) keeps its two bf16 fixes."""
    monkeypatch.setattr(norm_act, "uses_kernel", lambda x: False)
    gn = GroupNorm(4, 8)
    with torch.no_grad():
        gn.weight.uniform_(0.5, 1.5)
        gn.bias.uniform_(-0.5, 0.5)
    assert list(gn.state_dict()) == list(torch.nn.GroupNorm(4, 8).state_dict())
    x = torch.randn(3, 8, 5, 5) * 3 + 1
    ref = torch.nn.functional.group_norm(x, 4, gn.weight, gn.bias, gn.eps)
    assert torch.equal(gn(x), ref)  # float32: exactly nn.GroupNorm
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = gn(x.bfloat16())
        out32 = gn(x)  # float32 input under autocast: float32 as before
    assert out.dtype == torch.bfloat16 and out32.dtype == torch.float32
    assert (out.float() - ref).abs().max() < 0.05  # bf16 rounding of values up to ~4
    assert (out32 - ref).abs().max() < 1e-5
    # channels-last bf16 goes through the NCHW kernel and comes back channels-last, same numbers
    x_cl = x.bfloat16().contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_cl = gn(x_cl)
    assert out_cl.is_contiguous(memory_format=torch.channels_last) and torch.equal(out_cl, out)
    gn16 = GroupNorm(4, 8).to(torch.bfloat16)  # pure bf16 weights, no autocast
    gn16.load_state_dict({k: v.bfloat16() for k, v in gn.state_dict().items()})
    assert torch.equal(gn16(x_cl), out_cl)


def test_attention_differentiates_bf16_in_float32_on_cpu():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 1, 16, 8, generator=g) for _ in range(3))
    ref_q = q.clone().requires_grad_()
    ref = torch.nn.functional.scaled_dot_product_attention(ref_q, k, v)
    ref.square().sum().backward()
    q16 = q.bfloat16().requires_grad_()
    out = attention(q16, k.bfloat16(), v.bfloat16())
    out.float().square().sum().backward()
    assert out.dtype == torch.bfloat16 and q16.grad.dtype == torch.bfloat16
    assert (out.float() - ref).abs().max() < 0.05
    assert (q16.grad.float() - ref_q.grad).abs().max() < 0.05 * ref_q.grad.abs().max()
    mask = torch.tensor([True] * 8 + [False] * 8).view(1, 1, 1, 16)
    with torch.no_grad():
        masked = attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), mask)
    assert torch.allclose(masked.float(), torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask),
                          atol=0.05)


def test_coordconv_sees_time_and_position_before_every_convolution():
    net = from_preset("series-alg1")
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(isinstance(m, CoordConv2d) for m in convs)
    assert {m.kernel_size for m in convs} == {(1, 1), (3, 3)}
    assert isinstance(net, CoordConvUNet) and net.config["channels"] == [8, 16, 24]


def test_diffusers_twin_is_the_same_network():
    diffusers = pytest.importorskip("diffusers")
    assert count_parameters(diffusers.UNet2DModel(**diffusers_twin_kwargs("ddpm-cifar10"))) == 35_746_307
    net = _randomise(from_preset("mnist-small", num_classes=10), scale=0.05)
    twin = diffusers.UNet2DModel(**diffusers_twin_kwargs("mnist-small", num_classes=10)).eval()
    assert count_parameters(twin) == count_parameters(net)
    from difflab.interop.export import diffusers_state_dict

    twin.load_state_dict(diffusers_state_dict(net), strict=True)  # the export's mapping, timestep shift included
    x, t = _inputs(2, 1, 32)
    labels = torch.tensor([3, 10])
    with torch.no_grad():  # diffusers' timestep tau is difflab's step t = tau + 1
        assert torch.allclose(net(x, t, labels), twin(x, t - 1, class_labels=labels).sample, atol=1e-4)
