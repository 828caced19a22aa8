"""Rotary position embedding (rotate-half layout): one Triton launch for q and k, both ways.

Dimension i pairs with i + D/2: out1 = x1 cos - x2 sin, out2 = x2 cos + x1 sin. The
backward pass is the transposed rotation (sin negated), so nothing but cos/sin is saved.
q (B, H, T, D) and k (B, K, T, D) may be strided views (K <= H for grouped-query attention).
"""

import torch

from . import use_kernel

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only install: only the reference runs (use_kernel says no)
    triton = None


def rope_ref(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain PyTorch rotation of q (B, H, T, D) and k (B, K, T, D) by cos/sin (B, 1, T, D)."""
    return _apply_rope_ref(q, cos, sin), _apply_rope_ref(k, cos, sin)


def _apply_rope_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, heads, T, D) by the tables; halves pair dimension i with i + D/2."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos + rotated * sin


def rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, enabled: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotated (q, k): the Triton kernel on CUDA, else the reference."""
    if use_kernel(enabled, q, k, cos, sin) and q.numel() > 0 and k.numel() > 0:
        return _rope_triton(q, k, cos, sin)
    return rope_ref(q, k, cos, sin)


def _rope_triton(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton path (callable on CPU tensors under TRITON_INTERPRET=1, for tests)."""
    return _RopeFn.apply(q, k, cos, sin)


def _rotate(q, k, cos, sin, dtypes, backward: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the kernel once for q (B, H, T, D) and k (B, K, T, D); outputs in `dtypes`."""
    b, h, t, d = q.shape
    n_kv = k.shape[1]
    if d % 2 or k.shape != (b, n_kv, t, d):
        raise ValueError(f"rope: q {tuple(q.shape)} and k {tuple(k.shape)} do not match")
    cos, sin = cos.expand(b, 1, t, d), sin.expand(b, 1, t, d)  # (B, 1, T, D), maybe stride 0
    q_out = torch.empty_like(q, dtype=dtypes[0])  # same layout as the input
    k_out = torch.empty_like(k, dtype=dtypes[1])
    half = d // 2
    block_half = triton.next_power_of_2(half)
    cap = max(1, 2048 // block_half)  # heads per step: at most ~2048 elements a tile
    _rope_kernel[(b * t,)](
        q, q_out, k, k_out, cos, sin,
        *q.stride(), *q_out.stride(), *k.stride(), *k_out.stride(),
        cos.stride(0), cos.stride(2), cos.stride(3), sin.stride(0), sin.stride(2), sin.stride(3),
        t, half,
        H=h, K=n_kv, BLOCK_H=min(triton.next_power_of_2(h), cap),
        BLOCK_K=min(triton.next_power_of_2(n_kv), cap), BLOCK_HALF=block_half,
        BACKWARD=backward, num_warps=4,
    )  # fmt: skip
    return q_out, k_out


class _RopeFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin):
        ctx.save_for_backward(cos, sin)  # the rotation is linear: q and k are not needed
        ctx.dtypes = q.dtype, k.dtype
        # `x * cos` promotes in the reference: bf16 q with fp32 tables gives fp32.
        dtypes = torch.promote_types(q.dtype, cos.dtype), torch.promote_types(k.dtype, cos.dtype)
        return _rotate(q, k, cos, sin, dtypes, backward=False)

    @staticmethod
    def backward(ctx, dq_out, dk_out):
        cos, sin = ctx.saved_tensors
        dq, dk = _rotate(dq_out, dk_out, cos, sin, ctx.dtypes, backward=True)
        return dq, dk, None, None


if triton is not None:

    @triton.jit
    def _rope_heads(x_ptr, o_ptr, sx_b, sx_h, sx_t, sx_d, so_b, so_h, so_t, so_d,
                    b, t, c, s, half, N_HEADS: tl.constexpr, BLOCK: tl.constexpr,
                    BLOCK_HALF: tl.constexpr):  # fmt: skip
        """Rotate every head of token (b, t) of one tensor, BLOCK heads at a time."""
        d = tl.arange(0, BLOCK_HALF)[None, :]  # (1, D/2)
        for h0 in range(0, N_HEADS, BLOCK):
            hd = (h0 + tl.arange(0, BLOCK)[:, None]).to(tl.int64)  # (BLOCK, 1)
            mask = (hd < N_HEADS) & (d < half)
            x = x_ptr + b * sx_b + t * sx_t + hd * sx_h + d * sx_d
            o = o_ptr + b * so_b + t * so_t + hd * so_h + d * so_d
            x1 = tl.load(x, mask=mask, other=0.0).to(tl.float32)
            x2 = tl.load(x + half * sx_d, mask=mask, other=0.0).to(tl.float32)
            tl.store(o, (x1 * c - x2 * s).to(o_ptr.dtype.element_ty), mask=mask)
            tl.store(o + half * so_d, (x2 * c + x1 * s).to(o_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _rope_kernel(q_ptr, qo_ptr, k_ptr, ko_ptr, cos_ptr, sin_ptr,
                     sq_b, sq_h, sq_t, sq_d, sqo_b, sqo_h, sqo_t, sqo_d,
                     sk_b, sk_h, sk_t, sk_d, sko_b, sko_h, sko_t, sko_d,
                     sc_b, sc_t, sc_d, ss_b, ss_t, ss_d, n_tokens, half,
                     H: tl.constexpr, K: tl.constexpr, BLOCK_H: tl.constexpr,
                     BLOCK_K: tl.constexpr, BLOCK_HALF: tl.constexpr,
                     BACKWARD: tl.constexpr):  # fmt: skip
        """One program per token (b, t): all H query heads, then all K key heads."""
        pid = tl.program_id(0).to(tl.int64)
        b, t = pid // n_tokens, pid % n_tokens
        d = tl.arange(0, BLOCK_HALF)[None, :]  # (1, D/2): the tables' halves are equal
        c = tl.load(cos_ptr + b * sc_b + t * sc_t + d * sc_d, mask=d < half, other=0.0)
        s = tl.load(sin_ptr + b * ss_b + t * ss_t + d * ss_d, mask=d < half, other=0.0)
        c, s = c.to(tl.float32), s.to(tl.float32)
        if BACKWARD:  # the transpose of a rotation is the rotation by -angle
            s = -s
        _rope_heads(q_ptr, qo_ptr, sq_b, sq_h, sq_t, sq_d, sqo_b, sqo_h, sqo_t, sqo_d,
                    b, t, c, s, half, H, BLOCK_H, BLOCK_HALF)  # fmt: skip
        _rope_heads(k_ptr, ko_ptr, sk_b, sk_h, sk_t, sk_d, sko_b, sko_h, sko_t, sko_d,
                    b, t, c, s, half, K, BLOCK_K, BLOCK_HALF)  # fmt: skip
