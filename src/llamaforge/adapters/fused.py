"""One LoRA layer (frozen base matmul + low-rank path + scale + add) as one autograd node.

The unfused layer runs y = x @ W^T, then d = (x @ A^T * s) @ B^T as its own (..., out)
tensor, then y + d: two extra full-width passes (write d, read d and y, write the sum) and,
in the backward, a third matmul output for dx plus the add of the base's and the adapter's
input gradients. Here the second LoRA matmul accumulates straight into the base output
(`addmm_`, beta = 1: the add runs in the matmul's epilogue, accumulated in float32 and
rounded once), and in the backward the adapter's input gradient accumulates into the
base's the same way. The backward is derived by hand:

    h  = (x_d @ A^T) * s          (N, r), saved (x_d: x after LoRA dropout)
    dB = g^T @ h                   (out, r)
    dh = (g @ B) * s               (N, r)
    dA = dh^T @ x_d                (r, in)
    dx = g @ W  (+ dh @ A when there is no dropout; otherwise dh @ A is x_d's gradient)

Everything runs in one compute dtype (autocast's when it is on, as `F.linear` under autocast
would); gradients come back in each input's own dtype. The base weight is a frozen tensor
or an NF4 weight dequantised in the forward and again in the backward (never saved).
Tests compare values and gradients with the unfused layer under autograd.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .nf4 import NF4Weight


def _dense(weight: torch.Tensor | NF4Weight, dtype: torch.dtype) -> torch.Tensor:
    """The frozen weight (out, in) in `dtype` (NF4 dequantised; a plain one cast if needed)."""
    if isinstance(weight, NF4Weight):
        return weight.dequantize(dtype)
    return weight.to(dtype)


class _FusedLoRA(torch.autograd.Function):
    @staticmethod
    def forward(  # noqa: D102 - as fused_lora_linear
        ctx: Any,
        x: torch.Tensor,
        x_drop: torch.Tensor | None,
        weight: torch.Tensor | NF4Weight,
        bias: torch.Tensor | None,
        a: torch.Tensor,
        b: torch.Tensor,
        scaling: float,
        dtype: torch.dtype,
    ) -> torch.Tensor:
        lead, n_in = x.shape[:-1], x.shape[-1]
        x2 = x.reshape(-1, n_in).to(dtype)  # (N, in)
        xd2 = x2 if x_drop is None else x_drop.reshape(-1, n_in).to(dtype)
        ac, bc = a.to(dtype), b.to(dtype)  # (r, in), (out, r)
        y = F.linear(x2, _dense(weight, dtype), None if bias is None else bias.to(dtype))
        h = xd2 @ ac.t()  # (N, r)
        if scaling != 1.0:
            h.mul_(scaling)
        y.addmm_(h, bc.t())  # (N, out): the adapter's delta added in the matmul
        ctx.save_for_backward(xd2, h, ac, bc)
        ctx.weight, ctx.scaling, ctx.dropped = weight, scaling, x_drop is not None
        ctx.x_shape, ctx.x_dtype, ctx.ab_dtypes = x.shape, x.dtype, (a.dtype, b.dtype)
        return y.view(*lead, y.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):  # noqa: D102 - derivation in the module doc
        xd2, h, ac, bc = ctx.saved_tensors
        need_x, need_xd, _, _, need_a, need_b = ctx.needs_input_grad[:6]
        g = grad.reshape(-1, grad.shape[-1]).to(h.dtype)  # (N, out)
        db = (g.t() @ h).to(ctx.ab_dtypes[1]) if need_b else None  # (out, r)
        dx = dxd = da = None
        if need_x or need_xd or need_a:
            dh = g @ bc  # (N, r)
            if ctx.scaling != 1.0:
                dh.mul_(ctx.scaling)
            if need_a:
                da = dh.t() @ xd2  # (r, in)
            if need_x:
                dx = g @ _dense(ctx.weight, h.dtype)  # (N, in)
                if not ctx.dropped:
                    dx.addmm_(dh, ac)
            if need_xd:  # only with dropout: without it x_drop is None, not an input
                dxd = (dh @ ac).to(ctx.x_dtype).view(ctx.x_shape)
        if dx is not None:
            dx = dx.to(ctx.x_dtype).view(ctx.x_shape)
        if da is not None:
            da = da.to(ctx.ab_dtypes[0])
        return dx, dxd, None, None, da, db, None, None


def fused_lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor | NF4Weight,
    bias: torch.Tensor | None,
    a: torch.Tensor,
    b: torch.Tensor,
    scaling: float,
    dtype: torch.dtype,
    x_drop: torch.Tensor | None = None,
) -> torch.Tensor:
    """x @ W^T (+ bias) + (x_drop @ A^T * scaling) @ B^T, (..., in) -> (..., out), computed
    in `dtype` as one autograd node; x_drop is x after LoRA dropout (None: no dropout).

    W (out, in) is frozen (a tensor or an NF4 weight); A (r, in) and B (out, r) get their
    gradients in their own dtype. Returns `dtype`.
    """
    return _FusedLoRA.apply(x, x_drop, weight, bias, a, b, scaling, dtype)
