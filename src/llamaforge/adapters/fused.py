"""One LoRA layer (frozen base matmul + low-rank path + scale + add) as one autograd node.

The unfused layer runs y = x @ W^T, then d = (x @ A^T * s) @ B^T as its own (..., out)
tensor, then y + d: two extra full-width passes (write d, read d and y, write the sum) and,
in the backward, a third matmul output for dx plus the add of the base's and the adapter's
input gradients. Here the adapter's delta is written first and the frozen base matmul
accumulates onto it (`addmm_`, beta = 1: the add runs in the large matmul's epilogue,
where reading the delta hides under the compute; a rank-r matmul accumulating onto the
base output instead re-reads and re-writes the whole output, as slow as the add it
replaces), and in the backward the base's input gradient accumulates onto the adapter's
the same way. The backward is derived by hand:

    h  = (x_d @ A^T) * s          (N, r), saved (x_d: x after LoRA dropout)
    dB = g^T @ h                   (out, r)
    dh = (g @ B) * s               (N, r)
    dA = dh^T @ x_d                (r, in)
    dx = dh @ A + g @ W  (without dropout; with it dx = g @ W and dh @ A is x_d's gradient)

Everything runs in one compute dtype (autocast's when it is on, as `F.linear` under autocast
would); gradients come back in each input's own dtype. The base weight is a frozen tensor
or an NF4 weight dequantised in the forward and again in the backward (never saved).
Tests compare values and gradients with the unfused layer under autograd.

`fused_lora_group` does the same for several layers that read one input (q/k/v, gate/up),
as one node: their A matrices stacked, so the input is read once for all of them forward
(h = x @ [A_1; ...; A_n]^T) and backward (d[A_1; ...] = dh^T @ x), and one input gradient
dx = dh @ [A_1; ...] + sum_i g_i @ W_i accumulated in place, where separate layers would
each write their own dx and autograd would add them up.
"""

from __future__ import annotations

from collections.abc import Sequence
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
        h = xd2 @ ac.t()  # (N, r)
        if scaling != 1.0:
            h.mul_(scaling)
        y = F.linear(h, bc, None if bias is None else bias.to(dtype))  # (N, out): the delta
        y.addmm_(x2, _dense(weight, dtype).t())  # the base matmul accumulates onto it
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
                if ctx.dropped:
                    dx = g @ _dense(ctx.weight, h.dtype)  # (N, in)
                else:  # the adapter's part first, the base's accumulated onto it
                    dx = (dh @ ac).addmm_(g, _dense(ctx.weight, h.dtype))
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


class _FusedLoRAGroup(torch.autograd.Function):
    @staticmethod
    def forward(  # noqa: D102 - as fused_lora_group
        ctx: Any,
        x: torch.Tensor,
        weights: Sequence[torch.Tensor | NF4Weight],
        scaling: float,
        dtype: torch.dtype,
        *ab: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        n = len(weights)
        a_s, b_s = ab[:n], ab[n:]
        lead, n_in = x.shape[:-1], x.shape[-1]
        x2 = x.reshape(-1, n_in).to(dtype)  # (N, in)
        ac = torch.cat(a_s).to(dtype)  # (n*r, in): one read of x for every adapter
        bc = [b.to(dtype) for b in b_s]  # (out_i, r)
        h = x2 @ ac.t()  # (N, n*r)
        if scaling != 1.0:
            h.mul_(scaling)
        ranks = [a.shape[0] for a in a_s]
        hs = h.split(ranks, dim=1)  # (N, r_i) column views
        ys = []
        for w, hi, bi in zip(weights, hs, bc, strict=True):
            y = hi @ bi.t()  # (N, out_i): the delta, the base matmul accumulated onto it
            y.addmm_(x2, _dense(w, dtype).t())
            ys.append(y.view(*lead, y.shape[-1]))
        ctx.save_for_backward(x2, h, ac, *bc)
        ctx.weights, ctx.scaling, ctx.ranks = weights, scaling, ranks
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        ctx.ab_dtypes = [t.dtype for t in ab]
        return tuple(ys)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None):  # noqa: D102 - see the module doc
        x2, h, ac, *bc = ctx.saved_tensors
        n, dtype = len(bc), h.dtype
        gs = [None if g is None else g.reshape(-1, g.shape[-1]).to(dtype) for g in grads]
        hs = h.split(ctx.ranks, dim=1)
        db, dh_parts = [], []
        for g, hi, bi, r in zip(gs, hs, bc, ctx.ranks, strict=True):
            if g is None:  # an output that took no part in the loss
                db.append(torch.zeros_like(bi))
                dh_parts.append(h.new_zeros(h.shape[0], r))
                continue
            db.append(g.t() @ hi)  # (out_i, r)
            dh_parts.append(g @ bi)  # (N, r)
        dh = torch.cat(dh_parts, dim=1)  # (N, n*r)
        if ctx.scaling != 1.0:
            dh.mul_(ctx.scaling)
        da = dh.t() @ x2  # (n*r, in)
        dx = None
        if ctx.needs_input_grad[0]:  # e.g. not the first block's input (frozen embeddings)
            dx = dh @ ac  # (N, in), the base layers' input gradients accumulated into it
            for g, w in zip(gs, ctx.weights, strict=True):
                if g is not None:
                    dx.addmm_(g, _dense(w, dtype))
            dx = dx.to(ctx.x_dtype).view(ctx.x_shape)
        a_grads = [t.to(d) for t, d in zip(da.split(ctx.ranks), ctx.ab_dtypes[:n], strict=True)]
        b_grads = [t.to(d) for t, d in zip(db, ctx.ab_dtypes[n:], strict=True)]
        return dx, None, None, None, *a_grads, *b_grads


def fused_lora_group(
    x: torch.Tensor,
    weights: Sequence[torch.Tensor | NF4Weight],
    a_s: Sequence[torch.Tensor],
    b_s: Sequence[torch.Tensor],
    scaling: float,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, ...]:
    """x @ W_i^T + (x @ A_i^T * scaling) @ B_i^T for each layer i over one input, no bias, no
    dropout, as one autograd node in `dtype`; (..., in) -> tuple of (..., out_i).

    The W_i are frozen (tensors or NF4 weights); A_i (r_i, in) and B_i (out_i, r_i) get their
    gradients in their own dtypes, x in its own.
    """
    if not (len(weights) == len(a_s) == len(b_s)):
        raise ValueError("fused_lora_group needs one A and one B per weight")
    return _FusedLoRAGroup.apply(x, tuple(weights), scaling, dtype, *a_s, *b_s)
