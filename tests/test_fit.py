"""Fitting a network to the data, the device and the budget (difflab.nets.fit): the table's choices, the
growth with image size, divisibility errors, the FLOP count, the speed estimate and the slow-run warning."""

from __future__ import annotations

import math
import tempfile
import time
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from difflab.config import TrainConfig
from difflab.data import ImageData
from difflab.errors import UsageError
from difflab.nets import PRESETS, build, count_parameters, fit, register
from difflab.training.trainer import Trainer

CPU, GPU = torch.device("cpu"), torch.device("cuda")


def shape(channels: int, size: int, num_classes: int | None = None) -> SimpleNamespace:
    return SimpleNamespace(channels=channels, height=size, width=size, num_classes=num_classes)


def config(**kw) -> TrainConfig:
    return TrainConfig(data="folder", **kw)


@pytest.mark.parametrize(("channels", "size", "device", "kw", "name"), [
    (3, 32, CPU, {}, "mnist-small"),
    (3, 64, CPU, {}, "cpu-64"),
    (3, 128, CPU, {}, "cpu-128"),
    (3, 256, CPU, {}, "cpu-256"),
    (3, 40, CPU, {}, "mnist-small"),  # the nearest column in scale
    (3, 48, CPU, {}, "cpu-64"),
    (3, 16, CPU, {}, "mnist-small"),
    (3, 512, CPU, {}, "cpu-256"),
    (3, 32, GPU, {}, "ddpm-cifar10"),
    (3, 64, GPU, {}, "gpu-64"),
    (3, 256, GPU, {}, "gpu-256"),
    (1, 32, CPU, {}, "mnist-small"),  # grey 32 px: the MNIST benchmarks' networks, whatever the budget
    (1, 28, CPU, {"steps": 100_000}, "mnist-small"),
    (1, 32, GPU, {"steps": 100_000}, "mnist"),
    (1, 64, CPU, {}, "cpu-64"),
    (3, 64, CPU, {"steps": 100_000}, "cpu-64-wide"),  # a long budget: wider
    (3, 64, CPU, {"steps": 100_000, "time_limit": 180}, "cpu-64-wide"),
    (3, 64, CPU, {"steps": 100_000, "time_limit": 10}, "mnist-small"),  # the time limit is the budget
    (3, 64, CPU, {"steps": 20_000}, "cpu-64"),
    (3, 32, GPU, {"steps": 100_000}, "gpu-32-wide"),
    (3, 128, GPU, {"steps": 50_000}, "gpu-128-wide"),
])  # fmt: skip
def test_auto_preset_by_size_channels_device_and_budget(channels, size, device, kw, name):
    assert fit.auto_preset(channels, size, device, config(**kw)) == name


@pytest.mark.parametrize(("kw", "name"), [
    ({}, "cpu-64"),  # no time limit: 10,000 steps
    ({"time_limit": 20}, "mnist-small"),  # about 1,100 steps of cpu-64: too few
    ({"time_limit": 45}, "mnist-small"),
    ({"time_limit": 90}, "cpu-64"),  # about 5,100
    ({"time_limit": 20, "batch_size": 16}, "cpu-64"),  # four times the steps
    ({"time_limit": 20, "precision": "fp32"}, "mnist-small"),
])
def test_a_short_time_limit_takes_the_smaller_network(monkeypatch, kw, name):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)  # (and bf16, whatever this CPU computes natively)
    cfg = config(**{"precision": "bf16", **kw})
    assert fit.auto_preset(3, 64, CPU, cfg) == name
    steps = fit.expected_steps("cpu-64", 3, 64, CPU, cfg)
    assert (steps < fit.MIN_STEPS) == (name == "mnist-small")
    if "time_limit" not in kw:
        assert steps == math.inf


def test_the_smaller_network_is_the_one_measured(monkeypatch):
    """At 64 px with 20 minutes --model auto trains mnist-small as `--model mnist-small` does (the network the
    64 px race measured: attention in its middle block only), not moved to the 16 px level."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    auto = fit.network_config(config(time_limit=20, precision="bf16"), shape(3, 64), CPU, None)
    assert auto == fit.network_config(config(time_limit=20, model="mnist-small"), shape(3, 64), CPU, None)
    assert fit.cost(auto, (3, 64, 64)).parameters == 667_203
    # the 32 px choice still follows the image size to other sizes
    assert fit.network_config(config(time_limit=20), shape(3, 40), CPU, None)["attention_resolutions"] == [10]
    assert fit.auto_preset(3, 64, GPU, config(time_limit=1)) == "gpu-64"  # GPUs: no smaller network measured


def test_budget():
    assert fit.budget(config()) == "short"  # the default 10,000 steps
    assert fit.budget(config(steps=50_000)) == "long"
    assert fit.budget(config(steps=50_000, time_limit=119)) == "short"
    assert fit.budget(config(steps=50_000, time_limit=120)) == "long"


def test_every_choice_is_a_preset_of_its_size():
    for (device, _), names in fit.CHOICES.items():
        for size, name in zip(fit.SIZES, names):
            assert PRESETS[name]["image_size"] == size, name
            assert name in ("ddpm-cifar10", "mnist-small") or name.startswith(device), name


def _parameters(name: str, channels: int, size: int) -> int:
    with torch.device("meta"):  # no memory, no initialisation
        return count_parameters(build({**PRESETS[name], "in_channels": channels, "image_size": size}))


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("device", [CPU, GPU])
@pytest.mark.parametrize("steps", [10_000, 100_000])
def test_parameters_never_fall_as_the_images_grow(channels, device, steps):
    cfg = config(steps=steps)
    counts = [_parameters(fit.auto_preset(channels, s, device, cfg), channels, s) for s in fit.SIZES]
    assert counts == sorted(counts), counts
    assert counts[1] > counts[0]


def test_wider_on_gpus_and_with_a_longer_budget():
    for i, size in enumerate(fit.SIZES):
        cpu, cpu_wide, gpu, gpu_wide = (_parameters(fit.CHOICES[key][i], 3, size) for key in
                                        [("cpu", "short"), ("cpu", "long"), ("gpu", "short"), ("gpu", "long")])
        assert cpu < cpu_wide < gpu < gpu_wide, size


def test_levels_and_attention_follow_the_image_size():
    for size in fit.SIZES:
        for device in (CPU, GPU):
            conf = fit.network_config(config(), shape(3, size), device, None)
            lowest = size // 2 ** (len(conf["channel_mult"]) - 1)
            assert 4 <= lowest <= 8, (size, device)
            assert {16, 8} & set(conf["attention_resolutions"]), (size, device)
            kept = [fit.network_config(config(model=m), shape(3, size), device, None) for m in ("ddpm-cifar10", "mnist-small")]
            if conf not in kept:  # the networks kept from main until a colour race decides
                assert conf["attention_resolutions"] == [16, 8], (size, device)


def test_attention_stays_at_its_levels_for_other_sizes():
    conf = fit.network_config(config(), shape(3, 48), CPU, None)  # cpu-64's levels: 48, 24, 12, 6
    assert conf["image_size"] == 48
    assert conf["attention_resolutions"] == [12, 6]
    build(conf)(torch.zeros(1, 3, 48, 48), torch.zeros(1))


def test_mnist_default_unchanged():
    data = shape(1, 32, num_classes=10)
    expected = {
        "kind": "unet", "in_channels": 1, "out_channels": 1, "model_channels": 16, "channel_mult": [1, 2, 4],
        "num_res_blocks": 1, "attention_resolutions": [8], "num_heads": 1, "head_channels": 32, "dropout": 0.0,
        "image_size": 32, "num_classes": None, "context_dim": None, "use_scale_shift_norm": True, "norm_groups": 16,
    }  # fmt: skip
    assert fit.network_config(TrainConfig(data="mnist"), data, CPU, None) == expected
    assert fit.network_config(TrainConfig(data="mnist", conditioning="class"), data, CPU, None) == {
        **expected, "num_classes": 10}
    assert count_parameters(build(expected)) == 716_929


def test_explicit_model_unchanged():
    conf = fit.network_config(config(model="ddpm-cifar10"), shape(3, 64), CPU, None)
    assert conf == {**PRESETS["ddpm-cifar10"], "out_channels": 3, "image_size": 64}
    conf = fit.network_config(config(model="mnist-small"), shape(3, 64), GPU, None)
    assert conf == {**PRESETS["mnist-small"], "in_channels": 3, "out_channels": 3, "image_size": 64}
    assert fit.network_config(config(), shape(1, 32), CPU, None, preset="series-alg1")["kind"] == "coordconv_unet"


@pytest.mark.parametrize(("size", "device", "message"), [
    (46, CPU, "image size 46 is not divisible by 8 (the cpu-64 network downsamples 3 times); pass --image-size 40 or 48"),
    (42, CPU, "image size 42 is not divisible by 4 (the mnist-small network downsamples 2 times); pass --image-size 40 or 44"),
    (200, CPU, "image size 200 is not divisible by 32 (the cpu-256 network downsamples 5 times); pass --image-size "
               "192 or 224"),
    (30, GPU, "image size 30 is not divisible by 8 (the ddpm-cifar10 network downsamples 3 times); pass --image-size "
              "24 or 32"),
    (2, CPU, "image size 2 is not divisible by 4 (the mnist-small network downsamples 2 times); pass --image-size 4"),
])  # fmt: skip
def test_sizes_the_network_cannot_halve(size, device, message):
    with pytest.raises(UsageError) as e:
        fit.network_config(config(), shape(3, size), device, None)
    assert str(e.value) == message


def test_divisibility_counts_the_levels_of_channels_mult():
    fit.network_config(config(model="mnist-small", channels_mult="32,64"), shape(3, 14), CPU, None)  # 2 levels
    with pytest.raises(UsageError, match="^image size 14 is not divisible by 4 "):
        fit.network_config(config(model="mnist-small"), shape(3, 14), CPU, None)
    with pytest.raises(UsageError, match="^image size 36 is not divisible by 8 "):
        fit.network_config(config(channels_mult="16,32,64,64"), shape(3, 36), CPU, None)


def test_unknown_model():
    with pytest.raises(UsageError, match="unknown --model 'huge'; choose auto or one of ddpm-cifar10, "):
        fit.network_config(config(model="huge"), shape(3, 32), CPU, None)


@register("test_two_convs")
class TwoConvs(nn.Module):
    """3x3 conv c -> 8, 3x3 conv 8 -> c: small enough to count by hand."""

    def __init__(self, in_channels: int = 3, out_channels: int | None = None, image_size: int = 32) -> None:
        super().__init__()
        self.config = {"kind": "test_two_convs", "in_channels": in_channels, "out_channels": out_channels,
                       "image_size": image_size}
        self.a = nn.Conv2d(in_channels, 8, 3, padding=1)
        self.b = nn.Conv2d(8, out_channels or in_channels, 3, padding=1)

    def forward(self, x, t, class_labels=None, context=None, context_mask=None):
        return self.b(self.a(x))


def test_flop_count_by_hand():
    c, h, w = 3, 12, 10
    conv_a = 2 * (3 * 3 * c) * 8 * h * w  # multiply-adds x 2 per output element
    conv_b = 2 * (3 * 3 * 8) * c * h * w
    # backward: the weight gradient of each (as much work as its forward) and the input gradient of the
    # second (the images themselves need none)
    hand = conv_a + conv_b + conv_a + 2 * conv_b
    got = fit.cost({"kind": "test_two_convs", "in_channels": c}, (c, h, w))
    assert got == fit.Cost((9 * c * 8 + 8) + (9 * 8 * c + c), hand / 1e9)
    assert fit.cost(PRESETS["mnist-small"], (1, 32, 32)) == fit.Cost(716_929, 0.57831424)  # presets.py's table


def test_expected_speed_scales_with_threads_and_precision(monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    bf16 = fit.CPU_FLOPS_PER_THREAD["bf16"] * 2  # threads add as their square root
    assert fit.expected_images_per_second(2.0, CPU, "bf16") == pytest.approx(bf16 / 2e9)
    assert fit.expected_images_per_second(2.0, CPU, "fp32") < fit.expected_images_per_second(2.0, CPU, "bf16")
    assert fit.expected_images_per_second(2.0, torch.device("mps"), "bf16") is None


def test_expected_speed_within_a_factor_of_two_of_a_short_run(one_thread):
    """The estimate against the trainer's own step, timed by the process's CPU time with one thread, so that
    other programs on a shared machine do not count."""
    batch = 64
    g = torch.Generator().manual_seed(0)
    data = ImageData(images=torch.randint(0, 256, (batch, 3, 32, 32), generator=g, dtype=torch.uint8), labels=None,
                     class_names=None, name="synthetic")
    cfg = TrainConfig(data="synthetic", out=tempfile.mkdtemp(), batch_size=batch, steps=10**6, log_every=10**6,
                      checkpoint_every=10**6, sample_every=0, ema_snapshot_every=0)
    tr = Trainer(cfg, progress=False, log=lambda *a: None, data=data)
    assert tr.net_config == fit.network_config(cfg, data, CPU, None)
    for step in range(2):  # warm-up
        tr.train_step(step)
    cpu = time.process_time()
    for step in range(2, 6):
        tr.train_step(step)
    measured = 4 * batch / (time.process_time() - cpu)
    expected = fit.expected_images_per_second(fit.cost(tr.net_config, (3, 32, 32)).gflop, CPU, tr.cfg.precision)
    assert 0.5 < expected / measured < 2, (expected, measured)


def test_warning_for_256_px_on_a_cpu(monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    monkeypatch.setitem(fit.CPU_FLOPS_PER_THREAD, "bf16", 40e9 / 2**0.5)  # 40 GFLOP/s with two threads
    cfg = config(time_limit=10, precision="bf16")
    conf = fit.network_config(cfg, shape(3, 256), CPU, None)
    gflop = fit.cost(conf, (3, 256, 256)).gflop
    step = 64 * gflop / 40
    step64 = 64 * fit.cost(fit.network_config(cfg, shape(3, 64), CPU, None), (3, 64, 64)).gflop / 40  # mnist-small (10 minutes)
    assert step > 10 > step64  # (seconds above 10 are written without decimals)
    assert fit.speed_warning(cfg, conf, (3, 256, 256), CPU) == (
        f"warning: this run will be very slow: about {step:.0f} s a step ({40 / gflop:.1f} images/s expected on cpu) "
        f"and about {600 / step:,.0f} steps within --time-limit 10, where diffusion needs thousands of steps to draw "
        f"recognisable images. The run goes on; to train faster use --image-size 64 (about {step64:.1f} s "
        f"a step), a smaller --model or --channels-mult, a GPU (--device cuda) or a longer "
        f"--time-limit ({300 * step / 60:,.0f} minutes for 300 steps).")
    assert step > fit.SLOW_STEP_SECONDS
    # without a time limit the step time alone decides
    assert fit.speed_warning(config(precision="bf16"), conf, (3, 256, 256), CPU).startswith(
        f"warning: this run will be very slow: about {step:.0f} s a step ({40 / gflop:.1f} images/s expected on cpu) "
        f"and 10,000 steps would take {10_000 * step / 3600:.0f} hours, where")


@pytest.mark.parametrize("kw", [{}, {"time_limit": 10}, {"time_limit": 60}])
def test_256_px_on_a_two_core_cpu_warns_with_the_shipped_throughput(monkeypatch, kw):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    cfg = config(precision="bf16", **kw)
    conf = fit.network_config(cfg, shape(3, 256), CPU, None)
    assert fit.speed_warning(cfg, conf, (3, 256, 256), CPU).startswith("warning: this run will be very slow: about ")


def test_no_warning_for_the_defaults(monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    mnist = fit.network_config(TrainConfig(data="mnist", time_limit=10, precision="bf16"), shape(1, 32), CPU, None)
    assert fit.speed_warning(TrainConfig(data="mnist", time_limit=10, precision="bf16"), mnist, (1, 32, 32), CPU) is None
    colour = fit.network_config(config(), shape(3, 64), CPU, None)
    assert fit.speed_warning(config(time_limit=20, precision="bf16"), colour, (3, 64, 64), CPU) is None
    # a short run may be slow per step and still finish: fewer steps asked than the limit allows
    assert fit.speed_warning(config(time_limit=1, steps=5, precision="bf16"), colour, (3, 64, 64), CPU) is None


def test_start_line_and_warning_before_the_first_step(tmp_path):
    lines = []
    g = torch.Generator().manual_seed(0)
    data = ImageData(images=torch.randint(0, 256, (8, 3, 16, 16), generator=g, dtype=torch.uint8), labels=None,
                     class_names=None, name="synthetic")
    # 0.001 minutes leaves no room for 300 steps of even the tiny network
    cfg = TrainConfig(data="synthetic", out=str(tmp_path / "run"), model="tiny", batch_size=8, steps=1000, time_limit=0.001,
                      sample_every=0, sample_steps=2, ema_snapshot_every=0, precision="fp32")
    Trainer(cfg, progress=False, log=lines.append, data=data).run()
    gflop = fit.cost(dict(PRESETS["tiny"], in_channels=3, out_channels=3, image_size=16), (3, 16, 16)).gflop
    assert f"unet 0.01M parameters, {gflop:.2f} GFLOP per training image, about " in lines[0]
    assert lines[2].startswith("warning: this run will be very slow: ")
