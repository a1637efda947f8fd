"""``group_norm_act``: GroupNorm, then an optional per-sample ``* (1 + scale) + shift``, then optional SiLU.

Every norm of difflab's networks is one of these. On CPUs, for float32 and bfloat16 activations in
either memory format, it runs difflab's fused kernel (``csrc/group_norm_act.cpp``, one pass over memory
where the unfused chain makes about ten, forward and backward) as the custom op
``torch.ops.difflab.group_norm_act``, which autograd and torch.compile see as one op. Elsewhere (GPUs,
fp16, no compiler) it runs the same maths in plain torch (``group_norm_act_reference``).
"""

# no `from __future__ import annotations`: torch.library reads the op's schema from real annotations
from typing import Optional

import torch
import torch.nn.functional as F

from . import cpu_kernels

Tensor = torch.Tensor


def group_norm_reference(x: Tensor, groups: int, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    """``F.group_norm`` with two CPU bf16 fixes, for where the fused kernel is not used.

    - Under CPU autocast it stays in bf16 (autocast would run it in float32, two casts of the activations);
      the bf16 kernel accumulates in float32 anyway.
    - Channels-last bf16 input goes through the NCHW kernel: torch's channels-last bf16 kernel is up to
      25x slower (8.2 ms against 0.49 ms for 64x64x16x16, one thread), more than the transposes cost.
    """
    if x.dtype != torch.bfloat16 or x.device.type != "cpu":
        return F.group_norm(x, groups, weight, bias, eps)
    with torch.autocast("cpu", enabled=False):
        w, b = weight.to(x.dtype), bias.to(x.dtype)
        if x.is_contiguous() or not x.is_contiguous(memory_format=torch.channels_last):
            return F.group_norm(x, groups, w, b, eps)
        return F.group_norm(x.contiguous(), groups, w, b, eps).contiguous(memory_format=torch.channels_last)


def group_norm_act_reference(
    x: Tensor, weight: Tensor, bias: Tensor, groups: int, eps: float,
    scale: Optional[Tensor] = None, shift: Optional[Tensor] = None, act: bool = False,
) -> Tensor:  # fmt: skip
    """The definition, in plain torch operations (``scale``/``shift``: [N, C] or None)."""
    y = group_norm_reference(x, groups, weight, bias, eps)
    if scale is not None or shift is not None:
        n, c = x.shape[:2]
        expand = (n, c) + (1,) * (x.dim() - 2)
        k = 1 + scale.reshape(expand) if scale is not None else None
        if shift is None:
            y = y * k
        elif k is None:
            y = y + shift.reshape(expand)
        else:
            y = torch.addcmul(shift.reshape(expand), y, k)
    return F.silu(y) if act else y


def _layout(x: Tensor) -> tuple[Tensor, bool]:
    """``x`` dense in a layout the kernel reads, and whether that layout is channels-last."""
    if x.is_contiguous():
        return x, False
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return x, True
    return x.contiguous(), False


def _f32_ptr(t: Optional[Tensor], keep: list) -> Optional[int]:
    """Address of ``t`` as dense float32 (a converted copy is kept alive in ``keep``); None for None."""
    if t is None:
        return None
    if t.dtype != torch.float32 or not t.is_contiguous():
        t = t.detach().float().contiguous()
        keep.append(t)
    return t.data_ptr()


_DTYPES = {torch.float32: 0, torch.bfloat16: 1}


def _call(which: str, x: Tensor, groups: int, *args) -> None:
    """Run ``difflab_group_norm_act_<which>``; its non-zero return code is a RuntimeError."""
    rc = getattr(cpu_kernels.library(), f"difflab_group_norm_act_{which}")(*args)
    if rc:
        raise RuntimeError(f"group_norm_act {which} kernel: bad arguments (code {rc}) for shape {tuple(x.shape)}, "
                           f"{groups} groups")


def _kernel_forward(
    x: Tensor, weight: Tensor, bias: Tensor, scale: Optional[Tensor], shift: Optional[Tensor],
    groups: int, eps: float, act: bool,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """(y, mean [N, G], rstd [N, G]) from the C kernel."""
    x, cl = _layout(x)
    n, c = x.shape[:2]
    y = torch.empty_like(x)
    mean = x.new_empty((n, groups), dtype=torch.float32)
    rstd = torch.empty_like(mean)
    keep: list = []
    _call("forward", x, groups,
          x.data_ptr(), y.data_ptr(), mean.data_ptr(), rstd.data_ptr(), _f32_ptr(weight, keep), _f32_ptr(bias, keep),
          _f32_ptr(scale, keep), _f32_ptr(shift, keep), n, c, x.numel() // (n * c), groups, int(cl), _DTYPES[x.dtype],
          eps, int(act), torch.get_num_threads())  # fmt: skip
    return y, mean, rstd


def _kernel_backward(
    x: Tensor, dy: Tensor, weight: Tensor, bias: Tensor, scale: Optional[Tensor], shift: Optional[Tensor],
    mean: Tensor, rstd: Tensor, act: bool,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """(dx, s1 = sum dz [N, C], s2 = sum dz * xhat [N, C]) from the C kernel; z is the pre-activation."""
    x, cl = _layout(x)
    dy = dy.to(x.dtype).contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
    n, c = x.shape[:2]
    dx = torch.empty_like(x)
    s1 = x.new_empty((n, c), dtype=torch.float32)
    s2 = torch.empty_like(s1)
    keep: list = []
    _call("backward", x, mean.shape[1],
          x.data_ptr(), dy.data_ptr(), dx.data_ptr(), mean.data_ptr(), rstd.data_ptr(), _f32_ptr(weight, keep),
          _f32_ptr(bias, keep), _f32_ptr(scale, keep), _f32_ptr(shift, keep), s1.data_ptr(), s2.data_ptr(), n, c,
          x.numel() // (n * c), mean.shape[1], int(cl), _DTYPES[x.dtype], int(act), torch.get_num_threads())  # fmt: skip
    return dx, s1, s2


def _input_grads(weight, bias, scale, shift, s1, s2):
    """Gradients of weight, bias, scale, shift from the kernel's sums.

    With u = weight * xhat + bias and z = u * (1 + scale) + shift: s1 = sum dz, s2 = sum dz * xhat."""
    k = None if scale is None else 1 + scale.float()
    dweight = (s2 if k is None else s2 * k).sum(0).to(weight.dtype)
    dbias = (s1 if k is None else s1 * k).sum(0).to(bias.dtype)
    dscale = None if scale is None else (weight.float() * s2 + bias.float() * s1).to(scale.dtype)
    dshift = None if shift is None else s1.to(shift.dtype)
    return dweight, dbias, dscale, dshift


class _FusedGroupNormAct(torch.autograd.Function):
    """The eager path: a plain autograd.Function costs less per call than the custom op's dispatch
    (36.6 against 47.8 us for a tiny input, measured), which torch.compile needs and gets."""

    @staticmethod
    def forward(ctx, x, weight, bias, scale, shift, groups, eps, act):
        y, mean, rstd = _kernel_forward(x, weight, bias, scale, shift, groups, eps, act)
        ctx.save_for_backward(x, weight, bias, scale, shift, mean, rstd)
        ctx.groups, ctx.eps, ctx.act = groups, eps, act
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, scale, shift, mean, rstd = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: a differentiable backward, through the plain-torch ops
            inputs = (x, weight, bias, scale, shift)
            need = [t is not None and t.requires_grad for t in inputs]
            with torch.enable_grad():
                y = group_norm_act_reference(x, weight, bias, ctx.groups, ctx.eps, scale, shift, ctx.act)
                grads = iter(torch.autograd.grad(y, [t for t, n in zip(inputs, need) if n], dy, create_graph=True))
            return *(next(grads) if n else None for n in need), None, None, None
        dx, s1, s2 = _kernel_backward(x, dy, weight, bias, scale, shift, mean, rstd, ctx.act)
        return dx, *_input_grads(weight, bias, scale, shift, s1, s2), None, None, None


@torch.library.custom_op("difflab::group_norm_act", mutates_args=())
def _forward_op(
    x: Tensor, weight: Tensor, bias: Tensor, scale: Optional[Tensor], shift: Optional[Tensor],
    groups: int, eps: float, act: bool,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    return _kernel_forward(x, weight, bias, scale, shift, groups, eps, act)


@_forward_op.register_fake
def _(x, weight, bias, scale, shift, groups, eps, act):
    stats = x.new_empty((x.shape[0], groups), dtype=torch.float32)
    return torch.empty_like(x), stats, torch.empty_like(stats)


@torch.library.custom_op("difflab::group_norm_act_backward", mutates_args=())
def _backward_op(
    x: Tensor, dy: Tensor, weight: Tensor, bias: Tensor, scale: Optional[Tensor], shift: Optional[Tensor],
    mean: Tensor, rstd: Tensor, act: bool,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    return _kernel_backward(x, dy, weight, bias, scale, shift, mean, rstd, act)


@_backward_op.register_fake
def _(x, dy, weight, bias, scale, shift, mean, rstd, act):
    sums = x.new_empty(x.shape[:2], dtype=torch.float32)
    return torch.empty_like(x), sums, torch.empty_like(sums)


def _setup_context(ctx, inputs, output):
    x, weight, bias, scale, shift, _groups, _eps, act = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, bias, scale, shift, mean, rstd)
    ctx.act = act


def _backward(ctx, dy, _dmean, _drstd):
    x, weight, bias, scale, shift, mean, rstd = ctx.saved_tensors
    dx, s1, s2 = _backward_op(x, dy, weight, bias, scale, shift, mean, rstd, ctx.act)
    return dx, *_input_grads(weight, bias, scale, shift, s1, s2), None, None, None


_forward_op.register_autograd(_backward, setup_context=_setup_context)


def uses_kernel(x: Tensor) -> bool:
    """Whether ``group_norm_act`` runs the fused CPU kernel for this input."""
    return x.device.type == "cpu" and x.dtype in _DTYPES and x.dim() >= 3 and x.numel() > 0 and cpu_kernels.available()


def group_norm_act(
    x: Tensor, weight: Tensor, bias: Tensor, groups: int, eps: float = 1e-5,
    scale: Optional[Tensor] = None, shift: Optional[Tensor] = None, act: bool = False,
) -> Tensor:  # fmt: skip
    """``act(group_norm(x) * (1 + scale) + shift)``; ``x`` [N, C, ...], ``scale``/``shift`` [N, C] or None,
    ``act`` SiLU or identity. Output in the dtype and memory format of ``x``."""
    if x.dim() < 2 or x.shape[1] % groups:
        raise ValueError(f"group_norm_act: input {tuple(x.shape)} does not split into {groups} groups of channels")
    n, c = x.shape[:2]
    if weight.numel() != c or bias.numel() != c:
        raise ValueError(f"group_norm_act: {c} channels but weight/bias of {weight.numel()}/{bias.numel()}")
    for name, t in (("scale", scale), ("shift", shift)):
        if t is not None and t.numel() != n * c:
            raise ValueError(f"group_norm_act: {name} {tuple(t.shape)} does not broadcast as [{n}, {c}]")
    if not uses_kernel(x):
        return group_norm_act_reference(x, weight, bias, groups, eps, scale, shift, act)
    scale = None if scale is None else scale.reshape(n, c)
    shift = None if shift is None else shift.reshape(n, c)
    if torch.compiler.is_compiling():
        return _forward_op(x, weight, bias, scale, shift, groups, eps, act)[0]
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias, scale, shift)):
        return _FusedGroupNormAct.apply(x, weight, bias, scale, shift, groups, eps, act)
    return _kernel_forward(x, weight, bias, scale, shift, groups, eps, act)[0]  # inference: no autograd node
