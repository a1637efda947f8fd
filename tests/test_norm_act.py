"""The fused GroupNorm -> scale/shift -> SiLU CPU kernel against its plain-torch definition."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from difflab.nets import cpu_kernels, from_preset, norm_act
from difflab.nets.norm_act import group_norm_act

needs_kernel = pytest.mark.skipif(not cpu_kernels.available(), reason=f"no CPU kernel: {cpu_kernels.unavailable_reason()}")


def _float64_reference(x, w, b, groups, eps, scale, shift, act):
    """The definition in float64, written out independently of difflab."""
    n, c = x.shape[:2]
    xs = x.double().reshape(n, groups, -1)
    mean, var = xs.mean(-1, keepdim=True), xs.var(-1, unbiased=False, keepdim=True)
    xhat = ((xs - mean) / torch.sqrt(var + eps)).reshape(x.shape)
    view = (1, c) + (1,) * (x.dim() - 2)
    y = xhat * w.double().view(view) + b.double().view(view)
    if scale is not None:
        y = y * (1 + scale.double().view(n, c, *view[2:]))
    if shift is not None:
        y = y + shift.double().view(n, c, *view[2:])
    return y * torch.sigmoid(y) if act else y


def _inputs(n, c, h, groups, dtype, channels_last, scale_shift, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, h, generator=g) * 3 + 1
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x = x.to(dtype).requires_grad_()
    w = (torch.rand(c, generator=g) + 0.5).requires_grad_()
    b = (torch.rand(c, generator=g) - 0.5).requires_grad_()
    scale = (torch.randn(n, c, generator=g) * 0.5).requires_grad_() if scale_shift else None
    shift = torch.randn(n, c, generator=g).requires_grad_() if scale_shift else None
    return x, w, b, scale, shift


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("act", [False, True])
@pytest.mark.parametrize("scale_shift", [False, True])
def test_kernel_matches_the_definition_forward_and_backward(dtype, channels_last, act, scale_shift):
    x, w, b, scale, shift = _inputs(3, 12, 6, 4, dtype, channels_last, scale_shift)
    assert norm_act.uses_kernel(x)
    y = group_norm_act(x, w, b, 4, 1e-5, scale, shift, act)
    assert y.dtype == dtype and y.shape == x.shape
    assert y.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    (y.float() * dy).sum().backward()
    leaves = [t for t in (x, w, b, scale, shift) if t is not None]
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    ref_args = dict(zip(["x", "w", "b", "scale", "shift"], [*ref_leaves[:3], None, None]))
    if scale_shift:
        ref_args["scale"], ref_args["shift"] = ref_leaves[3:]
    ref = _float64_reference(**ref_args, groups=4, eps=1e-5, act=act)
    (ref * dy.double()).sum().backward()
    # float32: a few ulp; bf16: the output is rounded once, the input gradient once
    tol = 1e-5 if dtype == torch.float32 else 8e-3
    assert (y.double() - ref).abs().max() <= tol * ref.abs().max()
    for t, r in zip(leaves, ref_leaves):
        assert t.grad.dtype == t.dtype and t.grad.shape == t.shape
        assert (t.grad.double() - r.grad).abs().max() <= tol * r.grad.abs().max() + 1e-6, t.shape


@needs_kernel
def test_kernel_handles_odd_shapes_non_dense_input_and_many_channels_per_group():
    for n, c, h, groups in [(1, 6, 5, 3), (2, 64, 3, 1), (5, 7, 2, 7)]:
        x, w, b, scale, shift = _inputs(n, c, h, groups, torch.float32, False, True)
        y = group_norm_act(x, w, b, groups, 1e-5, scale, shift, True)
        ref = _float64_reference(x, w, b, groups, 1e-5, scale, shift, True)
        assert (y.double() - ref).abs().max() < 1e-5 * ref.abs().max()
    x = torch.randn(2, 8, 6, 10)[..., ::2]  # neither layout: made dense first
    y = group_norm_act(x, torch.ones(8), torch.zeros(8), 4)
    assert torch.allclose(y, F.group_norm(x, 4), atol=1e-5)
    empty = group_norm_act(torch.randn(0, 8, 4, 4), torch.ones(8), torch.zeros(8), 4, act=True)
    assert empty.shape == (0, 8, 4, 4)  # an empty batch (a rank's empty shard) takes the plain path
    x3 = torch.randn(2, 8, 50)  # [N, C, L]
    assert torch.allclose(group_norm_act(x3, torch.ones(8), torch.zeros(8), 2), F.group_norm(x3, 2), atol=1e-5)


def test_mismatched_parameters_are_a_clear_error():
    x = torch.randn(2, 8, 4, 4)
    with pytest.raises(ValueError, match="groups"):
        group_norm_act(x, torch.ones(8), torch.zeros(8), 3)
    with pytest.raises(ValueError, match="weight/bias of 6/8"):
        group_norm_act(x, torch.ones(6), torch.zeros(8), 4)
    with pytest.raises(ValueError, match=r"scale \(2, 4\)"):
        group_norm_act(x, torch.ones(8), torch.zeros(8), 4, scale=torch.zeros(2, 4))


@needs_kernel
def test_kernel_sigmoid_and_rounding_at_extremes():
    x = torch.tensor([-1e4, -100.0, -20.0, 0.0, 20.0, 100.0, 1e4, 1.0]).view(1, 8, 1, 1).repeat(2, 1, 2, 2)
    scale = torch.zeros(2, 8)
    shift = x[:, :, 0, 0].clone()  # the norm of a constant plane is 0: z = shift
    for dtype in (torch.float32, torch.bfloat16):
        y = group_norm_act(x.to(dtype), torch.ones(8), torch.zeros(8), 8, 1e-5, scale, shift, act=True)
        assert torch.isfinite(y).all()
        assert torch.allclose(y[:, :, 0, 0].float(), F.silu(shift.to(dtype).float()), rtol=1e-2, atol=1e-6)
    nan = x.clone()
    nan[0, 3, 0, 0] = float("nan")
    y = group_norm_act(nan, torch.ones(8), torch.zeros(8), 8, act=True)
    assert y[0, 3].isnan().all() and torch.isfinite(y[1]).all()  # a NaN spoils its own group only
    y16 = group_norm_act(nan.bfloat16(), torch.ones(8), torch.zeros(8), 8, act=True)
    assert y16[0, 3].isnan().all()


@needs_kernel
def test_kernel_silu_is_accurate_over_a_wide_range():
    z = torch.cat([torch.linspace(-100, 100, 20001), torch.tensor([-1e4, -88.5, 89.0, 1e4])])
    c = z.numel()
    y = group_norm_act(torch.zeros(1, c, 1, 1), torch.ones(c), torch.zeros(c), c, 1e-5, torch.zeros(1, c), z.view(1, c),
                       act=True).view(-1)
    ref = F.silu(z.double())
    err = (y.double() - ref).abs()
    assert (err <= 5e-7 * ref.abs() + 1e-30).all()  # relative, except far below zero where silu underflows


@needs_kernel
def test_kernel_bf16_silu_is_within_one_rounding_step():
    """bf16 outputs take a cheaper SiLU (a 1.4e-4 approximation, then bf16's 8-bit rounding): at most one
    bf16 step from the correctly rounded value, and equal to it almost everywhere."""
    z = torch.cat([torch.linspace(-30, 30, 30001), torch.tensor([-1e4, -100.0, 100.0, 1e4, 0.0])])
    c = z.numel()
    y = group_norm_act(torch.zeros(1, c, 1, 1, dtype=torch.bfloat16), torch.ones(c), torch.zeros(c), c, 1e-5,
                       torch.zeros(1, c), z.view(1, c), act=True).view(-1)
    ref = F.silu(z.double()).bfloat16()
    step = torch.finfo(torch.bfloat16).eps * ref.double().abs().clamp_min(1e-30)  # one ulp at the value's scale
    diff = (y.double() - ref.double()).abs()
    assert (diff <= step + 1e-38).all()
    assert (y == ref).double().mean() > 0.97


@needs_kernel
def test_second_derivatives_follow_the_definition():
    """create_graph=True (gradient penalties, Hessian-vector products) goes through differentiable ops."""
    grads = []
    for fn in (group_norm_act, norm_act.group_norm_act_reference):
        x, w, b, scale, shift = _inputs(2, 8, 4, 4, torch.float32, True, True)
        y = fn(x, w, b, 4, 1e-5, scale, shift, True)
        gx, = torch.autograd.grad(y.square().sum(), x, create_graph=True)
        gx.square().sum().backward()
        grads.append([t.grad for t in (x, w, b, scale, shift)])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)


@needs_kernel
def test_custom_op_passes_torch_opcheck_and_compiles():
    """Schema, fake (meta) implementation and autograd registration, as torch.compile needs them."""
    x, w, b, scale, shift = _inputs(2, 8, 4, 4, torch.float32, True, True)
    torch.library.opcheck(norm_act._forward_op, (x, w, b, scale, shift, 4, 1e-5, True))
    fn = torch.compile(lambda x, w, b, s, t: group_norm_act(x, w, b, 4, 1e-5, s, t, act=True), backend="aot_eager",
                       fullgraph=True)
    y = fn(x, w, b, scale, shift)
    y.square().sum().backward()
    grads = [t.grad.clone() for t in (x, w, b, scale, shift)]
    for t in (x, w, b, scale, shift):
        t.grad = None
    y_eager = group_norm_act(x, w, b, 4, 1e-5, scale, shift, act=True)
    y_eager.square().sum().backward()
    assert torch.equal(y, y_eager)
    assert all(torch.equal(g, t.grad) for g, t in zip(grads, (x, w, b, scale, shift)))


@needs_kernel
def test_network_gives_the_same_output_and_gradients_with_and_without_the_kernel(monkeypatch):
    torch.manual_seed(0)
    net = from_preset("tiny", num_classes=3).to(memory_format=torch.channels_last)
    for p in net.parameters():  # zero-initialised layers would hide differences
        torch.nn.init.normal_(p, std=0.2)
    x, t, y = torch.randn(4, 1, 32, 32), torch.tensor([1.0, 50.0, 300.0, 900.0]), torch.tensor([0, 1, 2, 3])

    def run():
        net.zero_grad()
        out = net(x, t, y)
        out.square().mean().backward()
        return out.detach(), [p.grad.clone() for p in net.parameters()]

    fused, fused_grads = run()
    monkeypatch.setattr(norm_act, "uses_kernel", lambda x: False)
    plain, plain_grads = run()
    assert torch.allclose(fused, plain, atol=1e-5, rtol=1e-4)
    for a, b in zip(fused_grads, plain_grads):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-3)


def test_without_a_compiler_everything_falls_back_with_one_warning(tmp_path):
    """No compiler on PATH: a one-line warning, then the plain-torch path gives the same numbers."""
    code = (
        "import warnings, torch\n"
        "from difflab.nets import cpu_kernels\n"
        "from difflab.nets.norm_act import group_norm_act, uses_kernel\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    x = torch.randn(2, 4, 3, 3)\n"
        "    y = group_norm_act(x, torch.ones(4), torch.zeros(4), 2, act=True)\n"
        "    group_norm_act(x, torch.ones(4), torch.zeros(4), 2)\n"
        "assert not uses_kernel(x) and cpu_kernels.library() is None\n"
        "assert torch.allclose(y, torch.nn.functional.silu(torch.nn.functional.group_norm(x, 2)), atol=1e-6)\n"
        "assert 'fused CPU GroupNorm unavailable' in str(w[0].message)\n"
        "print(len(w), cpu_kernels.unavailable_reason())\n"
    )
    env = {"PATH": str(tmp_path), "CXX": "", "DIFFLAB_CACHE": str(tmp_path), "HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "1 no C++ compiler found (install g++ or set CXX)"


@needs_kernel
def test_build_is_cached_and_a_broken_compiler_falls_back(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFLAB_CACHE", str(tmp_path / "cache"))
    path = cpu_kernels._build(cpu_kernels._compiler())
    assert path.parent == tmp_path / "cache" / "kernels" and path.exists()
    assert cpu_kernels._build(cpu_kernels._compiler()) == path  # second call: the cached file
    # no temporary left behind; the digest recorded at build time beside the library
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name, path.name + ".sha256"]
    fake = tmp_path / "bin" / "c++"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho 'c++ 1.0'\n[ \"$1\" = --version ] && exit 0\necho 'error: broken' >&2\nexit 1\n")
    fake.chmod(0o755)
    with pytest.raises(RuntimeError, match="broken"):
        cpu_kernels._build(str(fake))
    monkeypatch.setenv("DIFFLAB_CPU_KERNELS", "0")
    cpu_kernels.reset()
    try:
        assert cpu_kernels.library() is None and cpu_kernels.unavailable_reason() == "disabled by DIFFLAB_CPU_KERNELS=0"
    finally:
        monkeypatch.delenv("DIFFLAB_CPU_KERNELS")
        cpu_kernels.reset()
    assert cpu_kernels.library() is not None


@needs_kernel
@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86-64-v2 is an x86 target")
def test_portable_build_matches_the_definition_too(tmp_path):
    """The loops for CPUs without AVX-512 (a build for x86-64-v2), checked like the native build."""
    code = (
        "import torch, sys\n"
        "sys.path.insert(0, %r)\n"
        "import test_norm_act as t\n"
        "from difflab.nets import cpu_kernels\n"
        "assert cpu_kernels.library().difflab_kernels_avx512() == 0\n"
        "for dtype in (torch.float32, torch.bfloat16):\n"
        "    for cl in (False, True):\n"
        "        for act, ss in ((True, True), (False, False)):\n"
        "            t.test_kernel_matches_the_definition_forward_and_backward(dtype, cl, act, ss)\n"
        "t.test_kernel_handles_odd_shapes_non_dense_input_and_many_channels_per_group()\n"
        "t.test_kernel_sigmoid_and_rounding_at_extremes()\n"
        "print('ok')\n"
    ) % str(Path(__file__).parent)
    env = {**os.environ, "DIFFLAB_CPU_KERNEL_MARCH": "x86-64-v2", "DIFFLAB_CACHE": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
